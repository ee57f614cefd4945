"""Perplexity of the default dense model vs its training-free MoEfication (issue 6).

python eval/moefication_ppl.py [--out bench/results/moefication.json]
Held-out text below is different from the calibration text in service/freelunch/models/moefication.py.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

HELD_OUT = """\
The small village sat in a valley between two rivers. In spring the fields turned green, and farmers
planted wheat and barley while their children ran along the muddy roads to school.
A computer program is a sequence of instructions that tells a machine what to do. Programmers write code in
languages such as Python or C, and a compiler or interpreter turns it into actions.
Last week the city council approved a new plan to build bicycle lanes on the main streets. Supporters say the
lanes will reduce traffic and pollution, while some shop owners fear losing parking spaces.
Q: Why is the sky blue? A: Sunlight is scattered by the molecules in the air, and blue light is scattered
more than red light because it has a shorter wavelength.
She opened the window and listened to the birds. It was going to be a long day, but for now the house was
quiet and the coffee was hot.
"""

SETTINGS = [  # (experts, top_k, shared_fraction)
    (8, 8, 0.0), (8, 6, 0.0), (8, 4, 0.0), (8, 4, 0.5), (8, 2, 0.5), (16, 8, 0.0), (16, 8, 0.5), (16, 4, 0.5),
]


def main(argv=None):
    from freelunch.models.loader import default_model_path, gguf_to_folder
    from freelunch.models.moefication import convert, perplexity
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/moefication.json")
    ap.add_argument("--settings", default=None, help="e.g. 8:6:0,8:4:0.5")
    a = ap.parse_args(argv)
    settings = SETTINGS if not a.settings else [
        (int(e), int(k), float(s)) for e, k, s in (x.split(":") for x in a.settings.split(","))]
    torch.set_num_threads(2)
    src = gguf_to_folder(default_model_path())
    tok = AutoTokenizer.from_pretrained(str(src))
    dense = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    n_tokens = len(tok(HELD_OUT).input_ids)
    rows = [dict(model="dense", ppl=round(perplexity(dense, tok, HELD_OUT), 3))]
    print(rows[-1], flush=True)
    for e, k, s in settings:
        t = time.time()
        with tempfile.TemporaryDirectory() as d:
            out = convert(src, Path(d), num_experts=e, top_k=k, shared_fraction=s, model=dense, tokenizer=tok)
            moe = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
            cfg = moe.config
            active = cfg.shared_expert_intermediate_size + k * cfg.moe_intermediate_size
            rows.append(dict(model="moefied", experts=e, top_k=k, shared_fraction=s,
                             shared_neurons=cfg.shared_expert_intermediate_size,
                             active_mlp_fraction=round(active / dense.config.intermediate_size, 3),
                             ppl=round(perplexity(moe, tok, HELD_OUT), 3), seconds=round(time.time() - t, 1)))
            del moe
        print(rows[-1], flush=True)
    result = dict(source=str(src), held_out_tokens=n_tokens, transformers_reference="Qwen2MoeForCausalLM",
                  command="python eval/moefication_ppl.py", rows=rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(a.out)


if __name__ == "__main__":
    main()

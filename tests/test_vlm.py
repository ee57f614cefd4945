"""Vision-language models (LLaVA) and visual token pruning, against transformers on the same weights.

A tiny seeded LLaVA (CLIP vision tower + Llama decoder, SmolLM2's tokenizer with an `<image>`
token) is built in code and saved with its processor. Checked:
- greedy tokens equal transformers' `LlavaForConditionalGeneration.generate` (one and two images);
- `/v1/chat/completions` with data-URL images renders like transformers' processor, and bad
  images get 400s with `param`;
- `visual_pruning`: keep = 1 is plain decoding; `fastv` keeps the tokens transformers' own
  attention weights pick and decodes like a layer-by-layer reference over transformers' modules;
  `cls` equals transformers fed with the top [CLS]-attention features.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from freelunch.config import EngineConfig
from freelunch.engine.engine import Engine, EngineError
from freelunch.engine.kv_cache import KVCache, kv_cache_dtype
from freelunch.api.images import image_input
from freelunch.engine.request import GenerationRequest, ImageInput, SamplingParams, image_tensor
from freelunch.models.loader import load_model, resolve_source
from freelunch.pool import wire
from live_server import live_server, tiny_app
from PIL import Image
from tiny_models import default_tokenizer, tiny_llama_config

IMAGE_TOKEN = "<image>"
# ChatML like SmolLM2's, taking content lists with image parts (as LLaVA processors' templates do)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PATCHES = 49  # 28 x 28 pixels in 4 x 4 patches
N_TOKENS = 10


def build_tiny_llava(folder, vision: str = "clip", seed: int = 0):
    """A seeded LLaVA saved like a llava-hf checkpoint (config, safetensors, tokenizer, processor).

    clip: [CLS] + 49 patches, features of vision layer -2 without [CLS] ("default"), like LLaVA-1.5;
    siglip: 49 patches and no [CLS], features of two layers concatenated ("full")."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    default_tokenizer().save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=28, patch_size=4)
    if vision == "clip":
        vision_config, feature_layer, strategy = CLIPVisionConfig(**tower), -2, "default"
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    else:
        vision_config, feature_layer, strategy = SiglipVisionConfig(**tower), [-3, -1], "full"
        image_processor = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=tiny_llama_config("llama", vocab_size=len(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=PATCHES,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # scaled up so that images and pruning visibly change the argmax
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5 if "embed" in name else 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.05)
    model.save_pretrained(folder)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1 if vision == "clip" else 0,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    return model, processor


def random_image(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


class TinyVLM:
    def __init__(self, folder, hf, processor) -> None:
        self.folder, self.hf, self.processor = folder, hf, processor
        self.loaded = load_model(resolve_source(str(folder)), "float32")
        self.image_token_id = processor.image_token_id

    def engine(self, **config) -> Engine:
        config.setdefault("kv_cache_gib", 0.01)
        return Engine(self.loaded, EngineConfig(model=str(self.folder), dtype="float32", **config))

    def inputs(self, messages: list[dict], images: list[Image.Image]) -> dict:
        """transformers' own rendering: the processor's chat template, then the processor."""
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.processor(text=[text], images=images or None, return_tensors="pt", add_special_tokens=False)

    def hf_greedy(self, inputs: dict, n: int = N_TOKENS) -> list[int]:
        out = self.hf.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, inputs["input_ids"].shape[1] :].tolist()


def user(text: str, images: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def request(rid: str, inputs: dict, n: int = N_TOKENS, pruning: dict | None = None) -> GenerationRequest:
    pixels = inputs.get("pixel_values")
    return GenerationRequest(
        rid,
        inputs["input_ids"][0].tolist(),
        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
        methods={"visual_pruning": pruning} if pruning else {},
        images=[image_input(p) for p in pixels] if pixels is not None else [],
    )


def run(engine: Engine, requests: list[GenerationRequest]) -> dict[str, tuple[list[int], dict | None]]:
    for r in requests:
        engine.add_request(r)
    tokens: dict[str, list[int]] = {}
    stats: dict[str, dict | None] = {}
    for _ in range(500):
        if not engine.has_work():
            break
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                stats[o.request_id] = o.method_stats
    engine.check_no_leaks()
    return {rid: (tokens.get(rid, []), stats[rid]) for rid in stats}


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> TinyVLM:
    folder = tmp_path_factory.mktemp("tiny-llava")
    hf, processor = build_tiny_llava(folder)
    return TinyVLM(folder, hf, processor)


@pytest.fixture(scope="module")
def siglip_vlm(tmp_path_factory) -> TinyVLM:
    folder = tmp_path_factory.mktemp("tiny-llava-siglip")
    hf, processor = build_tiny_llava(folder, "siglip")
    return TinyVLM(folder, hf, processor)


@pytest.fixture(scope="module")
def one_image(vlm) -> dict:
    return vlm.inputs(user("What is in this picture?", 1), [random_image(1, (40, 31))])


# ---- the model ------------------------------------------------------------------------------


def test_greedy_matches_transformers(vlm, one_image):
    two = vlm.inputs(user("Compare them.", 2), [random_image(2, (28, 28)), random_image(3, (64, 35))])
    text = vlm.inputs(user("No picture here.", 0), [])
    assert (one_image["input_ids"] == vlm.image_token_id).sum() == PATCHES
    refs = {"one": vlm.hf_greedy(one_image), "two": vlm.hf_greedy(two), "text": vlm.hf_greedy(text)}
    other = vlm.inputs(user("What is in this picture?", 1), [random_image(4, (40, 31))])
    assert vlm.hf_greedy(other) != refs["one"], "the image must matter"
    # all three in one batch, with chunked prefill cutting through the images' tokens
    res = run(
        vlm.engine(max_num_batched_tokens=48),
        [request("one", one_image), request("two", two), request("text", text)],
    )
    assert {rid: toks for rid, (toks, _) in res.items()} == refs


def test_siglip_tower_with_two_feature_layers_matches_transformers(siglip_vlm):
    inputs = siglip_vlm.inputs(user("And this one?", 1), [random_image(12, (33, 50))])
    assert (inputs["input_ids"] == siglip_vlm.image_token_id).sum() == PATCHES  # no [CLS]: all patches
    res = run(siglip_vlm.engine(), [request("s", inputs), request("f", inputs, pruning={"method": "fastv"})])
    assert res["s"][0] == siglip_vlm.hf_greedy(inputs)
    assert res["f"][1]["visual_pruning"]["kept_image_tokens"] == round(PATCHES * 0.5)
    with pytest.raises(EngineError, match=r"\[CLS\]"):
        siglip_vlm.engine().add_request(request("c", inputs, pruning={"method": "cls"}))


def test_vision_tower_runs_once_for_the_choices_of_a_request(vlm, one_image):
    """n choices carry the same image: one tower run serves them all, with the same tokens."""
    engine = vlm.engine()
    vlm.loaded.model._tower_cache.clear()
    before = vlm.loaded.model.tower_runs
    res = run(engine, [request(f"c{i}", one_image) for i in range(3)])
    assert vlm.loaded.model.tower_runs - before == 1
    assert res["c0"][0] == res["c1"][0] == res["c2"][0] == vlm.hf_greedy(one_image)
    other = vlm.inputs(user("What is in this picture?", 1), [random_image(9, (40, 31))])
    run(engine, [request("o", other), request("p", one_image, pruning={"method": "cls", "keep": 0.5})])
    assert vlm.loaded.model.tower_runs - before == 3  # a new image, and cls needs the tower's attention


def test_image_inputs_cross_the_worker_pipe(one_image):
    req = request("w", one_image)
    back = wire.as_request(wire.decode(wire.encode(wire.ADD, req))[1])
    assert back.prompt_token_ids == req.prompt_token_ids
    assert torch.equal(image_tensor(back.images[0]), one_image["pixel_values"][0])
    bad = ImageInput(b"\0" * 12, [3, 28, 28])
    with pytest.raises(ValueError):
        image_tensor(bad)


def test_engine_refuses_mismatched_images(vlm, one_image, tiny_llama):
    engine = vlm.engine()
    no_image = request("a", one_image)
    no_image.images = []
    with pytest.raises(EngineError, match="placeholder"):
        engine.add_request(no_image)
    wrong_size = request("b", one_image)
    wrong_size.images = [image_input(torch.zeros(3, 14, 14))]
    with pytest.raises(EngineError, match="bad image"):
        engine.add_request(wrong_size)
    text_model = load_model(resolve_source(str(tiny_llama[0])), "float32")
    text_engine = Engine(text_model, EngineConfig(model=str(tiny_llama[0]), kv_cache_gib=0.01))
    with_image = request("c", {"input_ids": torch.tensor([[1, 2, 3]]), "pixel_values": one_image["pixel_values"]})
    with pytest.raises(EngineError, match="does not accept images"):
        text_engine.add_request(with_image)
    with pytest.raises(EngineError, match="vision-language"):
        text_engine.add_request(request("d", {"input_ids": torch.tensor([[1, 2, 3]])}, pruning={"method": "cls"}))
    engine.check_no_leaks()


# ---- pruning --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"method": "nope"},
        {"keep": 0.5},
        {"method": "fastv", "keep": 0},
        {"method": "fastv", "keep": 1.5},
        {"method": "fastv", "keep": "half"},
        {"method": "fastv", "layer": 0},
        {"method": "fastv", "layer": 3},
        {"method": "cls", "layer": 3},  # the band ends at the feature layer (-2: vision layer 2)
        {"method": "cls", "keep": 0.5, "extra": 1},
    ],
)
def test_bad_pruning_options(vlm, one_image, options):
    with pytest.raises(EngineError, match="visual_pruning"):
        vlm.engine().add_request(request("x", one_image, pruning=options))


def test_draft_compaction_moves_both_pools_of_a_split_cache(vlm, one_image):
    """Token Recycling's accepted-path compaction in a cache split at layer 2 (a vision model's
    default): the lower and the upper pool's entries move together, so output stays lossless."""
    engine = vlm.engine()
    assert engine.blocks.split == 2

    def speculative(rid: str) -> GenerationRequest:
        r = request(rid, one_image, 24)
        r.methods = {"speculative": {"method": "token_recycling", "tree": 6}}
        return r

    run(engine, [speculative("warm")])  # fills the draft table, so that drafts get accepted
    res = run(engine, [request("p", one_image, 24), speculative("s")])
    assert res["s"][0] == res["p"][0] == vlm.hf_greedy(one_image, 24)
    assert res["s"][1]["speculative"]["accepted_tokens"] > 0


def test_keep_one_is_plain_decoding(vlm, one_image):
    plain = vlm.hf_greedy(one_image)
    res = run(
        vlm.engine(),
        [request(m, one_image, pruning={"method": m, "keep": 1.0}) for m in ("fastv", "cls")],
    )
    for method in ("fastv", "cls"):
        tokens, stats = res[method]
        assert tokens == plain
        assert stats["visual_pruning"]["image_tokens"] == stats["visual_pruning"]["kept_image_tokens"] == PATCHES


def fastv_reference_keep(vlm, inputs: dict, layer: int, keep: float) -> list[int]:
    """Prompt offsets FastV keeps, from transformers' eager attention weights at decoder layer K - 1."""
    from transformers import LlavaForConditionalGeneration

    eager = LlavaForConditionalGeneration.from_pretrained(str(vlm.folder), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    scores = attentions[layer - 1][0, :, -1, :].mean(dim=0)  # last token, mean over heads
    ids = inputs["input_ids"][0]
    image = (ids == vlm.image_token_id).nonzero().flatten()
    kept = round(image.numel() * keep)
    ranked = scores[image].sort(descending=True).values
    assert ranked[kept - 1] - ranked[kept] > 1e-5, "a near tie would make the comparison fragile"
    top = image[scores[image].topk(kept).indices]
    text = (ids != vlm.image_token_id).nonzero().flatten()
    return sorted(torch.cat([text, top]).tolist())


def fastv_reference_tokens(vlm, inputs: dict, keep: list[int], layer: int, n: int = N_TOKENS) -> list[int]:
    """Greedy decoding where decoder layers < `layer` see every prompt token and later ones only `keep`
    (and everything generated), at the original positions; the whole forward is recomputed each step,
    layer by layer over transformers' modules, from transformers' merged image + text embeddings."""
    hf = vlm.hf
    lm = hf.model.language_model
    with torch.no_grad():
        features = torch.cat(hf.model.get_image_features(inputs["pixel_values"]).pooler_output)
        ids = inputs["input_ids"]
        prompt = lm.embed_tokens(ids).masked_scatter((ids == vlm.image_token_id)[..., None], features)
        dropped = sorted(set(range(ids.shape[1])) - set(keep))
        out: list[int] = []
        for _ in range(n):
            h = torch.cat([prompt, lm.embed_tokens(torch.tensor([out], dtype=torch.long))], dim=1)
            pos = torch.arange(h.shape[1])
            alive = torch.ones(h.shape[1], dtype=torch.bool)
            for i, block in enumerate(lm.layers):
                if i == layer:
                    alive[dropped] = False
                    h = h[:, alive]
                p = pos[alive] if i >= layer else pos
                mask = torch.full((1, 1, p.numel(), p.numel()), torch.finfo(h.dtype).min).triu(1)
                h = block(h, attention_mask=mask, position_embeddings=lm.rotary_emb(h, p[None]), position_ids=p[None])
            out.append(int(hf.lm_head(lm.norm(h))[0, -1].argmax()))
    return out


# the cache's split: -1 = at FastV's default layer 2 (pruning at 2 or 1 packs the upper table;
# at 1, layer 1 hides the pruned tokens in the lower table), 1 = below the pruning layer (the
# upper table keeps every token and hides the pruned ones from layer 2), 0 = none
@pytest.mark.parametrize("layer,keep,split", [(2, 0.5, -1), (1, 0.25, -1), (2, 0.5, 1), (2, 0.5, 0)])
def test_fastv_keeps_what_transformers_attention_picks(vlm, one_image, layer, keep, split):
    expected_keep = fastv_reference_keep(vlm, one_image, layer, keep)
    engine = vlm.engine(kv_split_layer=split)
    engine.add_request(request("f", one_image, pruning={"method": "fastv", "keep": keep, "layer": layer}))
    strategy = engine.requests["f"].strategy
    tokens = list(engine.step()[0].new_token_ids)  # the prefill, pruned at `layer`
    assert strategy.stage("visual_pruning").kept_offsets.tolist() == expected_keep
    kept = round(PATCHES * keep)
    main = strategy.main
    assert main.dropped_from == layer and len(main.dropped_offsets()) == PATCHES - kept
    assert len(main.block_table) == engine.blocks.blocks_for(main.num_prompt)
    if split == -1:  # pruned at or below the split: the upper layers hold only the kept tokens
        assert engine.blocks.split == 2 and main.upper_packed
        assert len(main.upper_table) == engine.blocks.blocks_for(main.num_prompt - (PATCHES - kept))
    elif split == 1:
        assert not main.upper_packed and len(main.upper_table) == len(main.block_table)
    while engine.has_work():
        for o in engine.step():
            tokens.extend(o.new_token_ids)
            stats = o.method_stats
    engine.check_no_leaks()
    assert stats["visual_pruning"] == {
        "method": "fastv", "keep": keep, "layer": layer, "image_tokens": PATCHES, "kept_image_tokens": kept
    }
    reference = fastv_reference_tokens(vlm, one_image, expected_keep, layer)
    assert tokens == reference
    assert reference != vlm.hf_greedy(one_image), "pruning should change this model's output"


@pytest.mark.parametrize("split", [0, 2])
def test_fastv_recompute_after_preemption_keeps_the_same_tokens(vlm, one_image, split):
    alone, _ = run(vlm.engine(), [request("f", one_image, 24, {"method": "fastv", "keep": 0.5})])["f"]
    other = vlm.inputs(user("Describe it in many words.", 1), [random_image(5, (30, 30))])
    # 10 blocks of 16 slots (per pool when split at layer 2): both 65-token prompts fit, not both
    # grown by 24 tokens (FastV's request holds 41 + 24 tokens in the upper pool, all 89 below it)
    cfg = vlm.loaded.model.config
    stored = kv_cache_dtype("auto", torch.float32, torch.device("cpu"))  # what the engine's cache stores
    per_token = KVCache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, stored)
    engine = vlm.engine(kv_cache_gib=10 * 16 * per_token / (1 << 30), kv_split_layer=split, kv_lower_blocks_ratio=1.0)
    assert engine.blocks.num_blocks == 10 and engine.blocks.split == (split or None)
    res = run(engine, [request("o", other, 24), request("f", one_image, 24, {"method": "fastv", "keep": 0.5})])
    assert engine.stats["preemptions"] > 0
    assert res["f"][0] == alone
    assert res["o"][0] == vlm.hf_greedy(other, 24)


def test_fastv_frees_the_upper_layers_kv_of_what_it_drops(vlm, one_image):
    """In a cache split at FastV's layer, a pruned request holds upper blocks for its kept tokens
    only, so more pruned requests run at once than plain ones, and their outputs do not change."""
    cfg = vlm.loaded.model.config
    stored = kv_cache_dtype("auto", torch.float32, torch.device("cpu"))  # what the engine's cache stores
    per_token = KVCache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, stored)
    budget = 20 * 16 * per_token / (1 << 30)  # 12 upper + 24 lower blocks of 16 slots at the default ratio 2
    fastv = {"method": "fastv", "keep": 0.25}
    alone = run(vlm.engine(), [request("f", one_image, 8, fastv)])["f"][0]

    def peak_running(options, caching=False) -> tuple[int, dict]:
        # without prefix caching: six requests with one prompt would share its blocks
        engine = vlm.engine(kv_cache_gib=budget, max_num_seqs=8, enable_prefix_caching=caching)
        assert (engine.blocks.num_blocks, engine.blocks.upper.num_blocks) == (24, 12)
        reqs = [request(f"r{i}", one_image, 8, options) for i in range(6)]
        for r in reqs:
            engine.add_request(r)
        peak, out = 0, {}
        while engine.has_work():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
            peak = max(peak, engine.num_running)
        engine.check_no_leaks()
        return peak, out

    plain_peak, _ = peak_running(None)
    pruned_peak, pruned = peak_running(fastv)
    # a 65-token prompt + 8 tokens: 5 blocks in each pool plain; 5 lower + 3 upper pruned (28 kept)
    assert plain_peak == 2
    assert peak_running(None, caching=True)[0] == 6  # with it, the six share the prompt's blocks and all run
    assert pruned_peak == 4  # the lower pool is the limit now: 24 // 5
    assert all(tokens == alone for tokens in pruned.values())


def test_cls_equals_transformers_fed_the_top_features(vlm):
    keep, band_start = 0.25, 1
    images = [random_image(6, (28, 40)), random_image(7, (50, 50))]
    inputs = vlm.inputs(user("Two pictures.", 2), images)
    hf = vlm.hf
    kept = round(PATCHES * keep)
    with torch.no_grad():  # VTC-CLS over transformers' eager vision tower
        tower = hf.model.vision_tower
        tower.set_attn_implementation("eager")
        out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        tower.set_attn_implementation("sdpa")
        scores = sum(a.mean(dim=1)[:, 0, 1:] for a in out.attentions[band_start:-1])  # layers 1..2 of 4
        top = scores.topk(kept, dim=1).indices.sort(dim=1).values
        features = out.hidden_states[-2][:, 1:]
        selected = torch.stack([f[t] for f, t in zip(features, top)])
        embeds = hf.model.multi_modal_projector(selected).flatten(0, 1)
        ids = inputs["input_ids"][0]
        image = (ids == vlm.image_token_id).nonzero().flatten()
        drop = torch.cat([image[i * PATCHES + kept : (i + 1) * PATCHES] for i in range(2)])  # each image's last ones
        alive = torch.ones(ids.numel(), dtype=torch.bool)
        alive[drop] = False
        short = ids[alive][None]
        lm = hf.model.language_model
        h = lm.embed_tokens(short).masked_scatter((short == vlm.image_token_id)[..., None], embeds)
        reference = hf.generate(
            inputs_embeds=h, attention_mask=torch.ones_like(short), max_new_tokens=N_TOKENS,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )[0].tolist()
    res = run(vlm.engine(), [request("c", inputs, pruning={"method": "cls", "keep": keep, "layer": band_start})])
    tokens, stats = res["c"]
    assert tokens == reference
    assert reference != vlm.hf_greedy(inputs)
    assert stats["visual_pruning"]["image_tokens"] == 2 * PATCHES
    assert stats["visual_pruning"]["kept_image_tokens"] == 2 * kept


# ---- the API --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(vlm):
    app, _ = tiny_app(vlm.folder)
    with live_server(app) as base:
        yield base


def chat(base: str, content, **body) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": N_TOKENS, "temperature": 0,
            "ignore_eos": True, **body}
    return httpx.post(base + "/v1/chat/completions", json=body, timeout=60)


def test_chat_with_images_matches_transformers(vlm, api):
    images = [random_image(8, (45, 30)), random_image(9, (30, 30))]
    content = [
        {"type": "text", "text": "First "},
        {"type": "image_url", "image_url": {"url": data_url(images[0])}},
        {"type": "text", "text": "then "},
        {"type": "image_url", "image_url": {"url": data_url(images[1], "JPEG")}},
    ]
    # transformers' rendering of the same message (images decoded from the same bytes)
    decoded = [Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",")[1]))) for p in content[1::2]]
    parts = [{"type": "text", "text": "First "}, {"type": "image"}, {"type": "text", "text": "then "}, {"type": "image"}]
    inputs = vlm.inputs([{"role": "user", "content": parts}], decoded)
    expected = vlm.processor.decode(vlm.hf_greedy(inputs), skip_special_tokens=True)
    r = chat(api, content)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == expected
    assert body["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1]
    pruned = chat(api, content, visual_pruning={"method": "cls", "keep": 0.5}).json()
    kept = round(PATCHES * 0.5)
    assert pruned["usage"]["method_stats"]["visual_pruning"]["kept_image_tokens"] == 2 * kept
    metrics = httpx.get(api + "/metrics").text
    assert f'freelunch_visual_pruning_pruned_tokens_total{{method="cls"}} {2 * (PATCHES - kept)}.0' in metrics


def _bomb() -> str:
    """A PNG of 5000 x 5000 black pixels: ~100 KB of file, 75 MB once decoded."""
    return data_url(Image.new("RGB", (5000, 5000)))


BAD_IMAGES = [
    ("http-url", "https://example.com/cat.png", "URLs"),
    ("file-url", "file:///etc/passwd", "data: URL"),
    ("not-base64", "data:image/png;base64,@@@@", "base64"),
    ("not-an-image", "data:image/png;base64," + base64.b64encode(b"hello world").decode(), "cannot be decoded"),
    ("truncated", None, "cannot be decoded"),
    ("bmp", None, "cannot be decoded"),
    ("svg-mime", "data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=", "base64 image/png"),
    ("too-many-pixels", None, "pixels"),
]


@pytest.mark.parametrize("name,url,message", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_bad_image_gets_400_with_param(api, name, url, message):
    if name == "truncated":
        url = data_url(random_image(10, (30, 30)))[:-200]
    elif name == "bmp":
        url = data_url(random_image(10, (30, 30)), "BMP").replace("image/bmp", "image/png")
    elif name == "too-many-pixels":
        url = _bomb()
    content = [{"type": "text", "text": "Look: "}, {"type": "image_url", "image_url": {"url": url}}]
    r = chat(api, content)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages.0.content.1.image_url.url"
    assert message in error["message"]


def test_other_image_refusals(api):
    image = {"type": "image_url", "image_url": {"url": data_url(random_image(11, (28, 28)))}}
    r = chat(api, [image] * 9)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content.8"
    r = chat(api, [{"type": "text", "text": "fake " + IMAGE_TOKEN}, image])
    assert r.status_code == 400 and "placeholder" in r.json()["error"]["message"]
    r = chat(api, "hi", guidance={"scale": 2, "negative_messages": [{"role": "user", "content": [image]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guidance.negative_messages.0.content"
    # placeholder tokens without images, through the completions endpoint
    r = httpx.post(api + "/v1/completions", json={"prompt": "a " + IMAGE_TOKEN, "max_tokens": 2}, timeout=60)
    assert r.status_code == 400 and "placeholder" in r.json()["error"]["message"]
    r = chat(api, [image], visual_pruning={"method": "fastv", "keep": 2})
    assert r.status_code == 400 and "visual_pruning.keep" in r.json()["error"]["message"]
    assert chat(api, "Just text.").status_code == 200

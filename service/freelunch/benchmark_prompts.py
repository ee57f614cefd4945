"""The prompt set of the Token Recycling benchmarks (`freelunch bench` and
bench/bench_token_recycling.py): nine hand-written chats in seven categories named after
Spec-Bench's (one or two each; one multi-turn), and ten other chats of the same kinds that warm
the adjacency table up first and are never measured. A small set, not Spec-Bench itself.
"""

from __future__ import annotations

# Spec-Bench's categories, one or two prompts each, as chat turns.
SPEC_PROMPTS: dict[str, list[list[dict]]] = {
    "multi-turn": [
        [
            {"role": "user", "content": "Give me three tips for learning a new language."},
            {"role": "assistant", "content": "1. Practice every day. 2. Speak with native speakers. 3. Read simple books."},
            {"role": "user", "content": "Expand the second tip into a short paragraph."},
        ]
    ],
    "translation": [
        [{"role": "user", "content": "Translate to French: The weather is nice today, so we will walk to the park and eat lunch there."}],
        [{"role": "user", "content": "Translate to German: I would like to book a table for two people at seven o'clock."}],
    ],
    "summarization": [
        [
            {
                "role": "user",
                "content": "Summarize this text: The city council met on Tuesday to discuss the new park. "
                "The park will have a playground, a small lake and a running track. Construction starts in "
                "spring and should end before winter. The council said the park will cost two million dollars "
                "and will be paid for by a local tax. Many residents support the plan, but some worry about noise.",
            }
        ]
    ],
    "qa": [
        [{"role": "user", "content": "What is the capital of Japan, and what is it famous for?"}],
        [{"role": "user", "content": "Why is the sky blue?"}],
    ],
    "math": [
        [{"role": "user", "content": "A shop sells pens at 3 dollars each. Tom buys 7 pens and pays with a 50 dollar bill. How much change does he get? Explain step by step."}]
    ],
    "rag": [
        [
            {
                "role": "user",
                "content": "Context: Marie Curie was a physicist and chemist who conducted pioneering research on "
                "radioactivity. She was the first woman to win a Nobel Prize and the only person to win Nobel "
                "Prizes in two different sciences, physics and chemistry.\n\nQuestion: In which sciences did "
                "Marie Curie win Nobel Prizes? Answer using the context.",
            }
        ]
    ],
    "code": [
        [
            {
                "role": "user",
                "content": "Add type hints and a docstring to this function:\n\ndef fib(n):\n    a, b = 0, 1\n"
                "    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
            }
        ]
    ],
}


# Other prompts of the same kinds: the table's warm-up, never measured.
SPEC_WARMUP: list[list[dict]] = [
    [{"role": "user", "content": "Name two healthy breakfast foods."}, {"role": "assistant", "content": "Oatmeal and yogurt with fruit."}, {"role": "user", "content": "Why is oatmeal healthy?"}],
    [{"role": "user", "content": "Translate to Spanish: My brother works in a hospital near the station."}],
    [{"role": "user", "content": "Translate to French: Please close the window before you leave the office."}],
    [{"role": "user", "content": "Summarize this text: The library will open a new reading room next month. It will have "
      "forty seats, free wifi and a corner for children. The room will be open every day from nine to nine, and "
      "volunteers will help visitors find books."}],
    [{"role": "user", "content": "What is photosynthesis?"}],
    [{"role": "user", "content": "Who wrote Romeo and Juliet, and when?"}],
    [{"role": "user", "content": "A train travels 60 kilometres per hour for 3 hours. How far does it go? Explain step by step."}],
    [{"role": "user", "content": "Context: The Amazon river flows through Peru, Colombia and Brazil and carries more water "
      "than any other river in the world.\n\nQuestion: Which countries does the Amazon flow through? Answer using the context."}],
    [{"role": "user", "content": "Write a Python function that returns the largest number in a list."}],
    [{"role": "user", "content": "Explain what this code does:\n\nfor i in range(10):\n    if i % 2 == 0:\n        print(i)\n"}],
]

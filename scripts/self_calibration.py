"""Calibration text in Chinese, Korean and English written by the model itself, mixed with
standard-library code: the calibration of the last row of docs/quantization.md's GPTQ ablations.

    .venv/bin/python scripts/self_calibration.py MODEL OUT.jsonl [--prompts 48] [--max-tokens 320]

The model answers 36 everyday and programming prompts (12 per language, none about Qwen or the
shared evaluation texts) with temperature 0.8 / top-p 0.95, 12 at a time through batched
generation; each answer, its prompt first, becomes a JSONL "text" line, alternating with the
first 2000 characters of a standard-library module (the default calibration's pool). Use the
file with `qmlx convert … --calib OUT.jsonl`. ~25 minutes for 48 answers on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qmlx  # noqa: E402  (OpenBLAS before mlx.core)
from convert.calib import stdlib_files  # noqa: E402
from qmlx.batch import batch_generate  # noqa: E402

EN = ["how rainbows form", "the history of the printing press", "writing a binary search in C",
      "why the sky is blue", "how to cook rice", "the causes of the French revolution",
      "explaining recursion to a child", "a short story about a lighthouse keeper",
      "how compilers optimize loops", "tips for learning a new language", "the water cycle",
      "designing a REST API"]  # fmt: skip
ZH = ["请写一篇关于长城历史的短文。", "解释一下什么是机器学习。", "写一个关于秋天的小故事。",
      "如何学习编程？请给出建议。", "介绍一下中国的茶文化。", "解释快速排序算法的原理。",
      "写一封给朋友的信，谈谈你的旅行。", "为什么要保护环境？", "介绍一下Linux操作系统。",
      "描述一下你理想中的城市。", "解释什么是数据库索引。", "写一篇关于读书的好处的文章。"]  # fmt: skip
KO = ["한국의 전통 음식에 대해 설명해 주세요.", "인공지능이 무엇인지 쉽게 설명해 주세요.",
      "가을에 관한 짧은 이야기를 써 주세요.", "프로그래밍을 배우는 좋은 방법은 무엇인가요?",
      "서울의 역사에 대해 알려 주세요.", "정렬 알고리즘의 종류를 설명해 주세요.",
      "친구에게 여행 이야기를 담은 편지를 써 주세요.", "환경 보호가 왜 중요한가요?",
      "운영체제가 하는 일을 설명해 주세요.", "좋은 습관을 만드는 방법을 알려 주세요.",
      "데이터베이스란 무엇인가요?", "독서의 장점에 대한 글을 써 주세요."]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=320)
    a = ap.parse_args()
    order = [p for i in range(12) for p in (ZH[i], KO[i], f"Write a detailed explanation of {EN[i]}.")]
    order = (order * (a.prompts // len(order) + 1))[: a.prompts]
    model, tok = qmlx.load(a.model)
    answers = []
    for start in range(0, len(order), 12):
        chunk = order[start : start + 12]
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                   for p in chunk]  # fmt: skip
        results = batch_generate(model, tok, prompts, max_tokens=a.max_tokens, temperature=0.8,
                                 top_p=0.95, top_k=0, seed=start)  # fmt: skip
        answers += [p + r.text for p, r in zip(chunk, results)]
        print(f"{len(answers)}/{len(order)} answers", file=sys.stderr, flush=True)
    files = stdlib_files()
    random.Random(0).shuffle(files)
    with open(a.out, "w", encoding="utf-8") as f:
        for answer, path in zip(answers, files):
            with open(path, encoding="utf-8", errors="ignore") as src:
                code = src.read()[:2000]
            for text in (answer, code):
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()

"""`qmlx eval`'s GSM8K, KoBEST and custom JSONL tasks: the published data formats (Parquet and JSONL),
errors that name file, line and field, answer extraction, macro-F1, the prompts, choice scoring, and the
command end to end on a tiny model (with its item cache)."""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import numpy as np
import pytest
from tiny import tiny_config, write_folder

import qmlx
import qmlx.batch
import qmlx.eval.choices
from qmlx.cli import main
from qmlx.eval import custom, gsm8k, kobest
from qmlx.eval.data import DataError
from qmlx.eval.run import evaluate

# ------------------------------------------------------------------ files in the published formats


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


GSM_TRAIN = [
    {"question": "Tom has 3 apples and buys 5 more. How many apples does he have?",
     "answer": "Tom has 3 + 5 = <<3+5=8>>8 apples.\n#### 8"},
    {"question": "A book costs $12. How much do 4 books cost?",
     "answer": "4 books cost 4 * 12 = <<4*12=48>>48 dollars.\n#### 48"},
    {"question": "Mia ran 2 km on Monday and twice as far on Tuesday. How far did she run in total?",
     "answer": "On Tuesday she ran 2 * 2 = <<2*2=4>>4 km.\nIn total she ran 2 + 4 = <<2+4=6>>6 km.\n#### 6"},
]  # fmt: skip
GSM_TEST = [
    {"question": "A farm has 1,200 chickens and buys 34 more. How many chickens are there now?",
     "answer": "There are 1200 + 34 = <<1200+34=1234>>1234 chickens.\n#### 1,234"},
    {"question": "Sam had 10 dollars and spent 15. What is his balance?",
     "answer": "His balance is 10 - 15 = <<10-15=-5>>-5 dollars.\n#### -5"},
    {"question": "Half of 9 is what?", "answer": "Half of 9 is 9 / 2 = <<9/2=4.5>>4.5\n#### 4.5"},
]  # fmt: skip


def gsm_hub_folder(root):
    """Hugging Face's openai/gsm8k layout (config main)."""
    write_parquet(root / "main" / "test-00000-of-00001.parquet", GSM_TEST)
    write_parquet(root / "main" / "train-00000-of-00001.parquet", GSM_TRAIN)
    return str(root)


def gsm_github_folder(root):
    """The original release's grade_school_math/data/."""
    write_jsonl(root / "test.jsonl", GSM_TEST)
    write_jsonl(root / "train.jsonl", GSM_TRAIN)
    return str(root)


KOBEST = {
    "boolq": [
        {"paragraph": "세종대왕은 조선의 제4대 왕으로, 1443년에 훈민정음을 창제하였다. 그는 과학과 농업의 발전에도 힘썼다.",
         "question": "훈민정음은 세종대왕 때 만들어졌는가?", "label": 1},
        {"paragraph": "한라산은 제주도 중앙에 있는 화산으로, 높이는 약 1,950미터이다. 정상에는 백록담이라는 화구호가 있다.",
         "question": "한라산은 강원도에 있는가?", "label": 0},
        {"paragraph": "김치는 배추나 무 같은 채소를 소금에 절인 뒤 양념하여 발효시킨 음식이다.",
         "question": "김치는 발효 음식인가?", "label": 1},
    ],
    "copa": [
        {"premise": "아이가 넘어져서 무릎을 다쳤다.", "question": "결과",
         "alternative_1": "아이가 울음을 터뜨렸다.", "alternative_2": "아이가 노래를 불렀다.", "label": 0},
        {"premise": "길이 온통 젖어 있었다.", "question": "원인",
         "alternative_1": "밤새 비가 내렸다.", "alternative_2": "햇볕이 뜨거웠다.", "label": 0},
        {"premise": "그는 알람 소리를 듣지 못했다.", "question": "결과",
         "alternative_1": "그는 일찍 출근했다.", "alternative_2": "그는 회사에 지각했다.", "label": 1},
    ],
    "wic": [
        {"word": "배", "context_1": "점심을 많이 먹었더니 [배]가 부르다.", "context_2": "항구에 큰 [배]가 들어왔다.",
         "label": 0},
        {"word": "눈", "context_1": "밤새 [눈]이 내려 온 세상이 하얗다.\t", "context_2": "아침부터 함박[눈]이 쏟아졌다.",
         "label": 1},
    ],
    "hellaswag": [
        {"context": "민수는 냄비에 물을 붓고 가스레인지 불을 켰다. 잠시 후 물이 끓기 시작했다.",
         "ending_1": "민수는 라면과 스프를 냄비에 넣었다.", "ending_2": "민수는 냄비를 냉장고에 넣었다.",
         "ending_3": "민수는 물이 얼 때까지 기다렸다.", "ending_4": "민수는 가스레인지를 창밖으로 던졌다.", "label": 0},
        {"context": "지수가 운동화 끈을 단단히 묶고 공원에 나갔다.",
         "ending_1": "지수는 침대에 누워 잠이 들었다.", "ending_2": "지수는 공원 산책로를 따라 달리기 시작했다.",
         "ending_3": "지수는 운동화를 벗어 가방에 넣었다.", "ending_4": "지수는 공원에서 집으로 이사했다.", "label": 1},
    ],
    "sentineg": [
        {"sentence": "이 식당의 음식은 정말 맛있었다.", "label": 1},
        {"sentence": "배송이 너무 늦어서 실망스러웠다.", "label": 0},
        {"sentence": "서비스가 나쁘지 않았다.", "label": 1},
        {"sentence": "영화가 기대만큼 재미있지는 않았다.", "label": 0},
    ],
}  # fmt: skip


def kobest_folder(root):
    """Each task in one of the Hub's layouts: main's JSONL, the parquet conversion, a shard, one file."""
    write_jsonl(root / "boolq" / "test.jsonl", KOBEST["boolq"])
    write_jsonl(root / "boolq" / "train.jsonl", KOBEST["boolq"][::-1])
    write_parquet(root / "copa" / "test" / "0000.parquet", KOBEST["copa"])
    write_parquet(root / "copa" / "train" / "0000.parquet", KOBEST["copa"][1:])
    write_parquet(root / "wic" / "test-00000-of-00001.parquet", KOBEST["wic"])
    write_jsonl(root / "hellaswag" / "test.jsonl", KOBEST["hellaswag"])
    write_parquet(root / "sentineg.parquet", KOBEST["sentineg"])
    return str(root)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    write_folder(str(root / "m"), tiny_config())
    return str(root / "m")


# ------------------------------------------------------------------ GSM8K


@pytest.mark.parametrize(
    "text,number",
    [
        ("so the total is 1234.\n#### 1,234", "1234"),
        ("He pays $5.", "5"),
        ("First 3, then 7 more, so 42 in all", "42"),  # no ####: the last number
        ("The balance is -5 dollars", "-5"),
        ("#### -2.50", "-2.5"),
        ("#### $1,000.", "1000"),
        ("12 + 7 = 19 #### 19 and then 3", "19"),  # the number right after ####, not the last
        ("it took 3-4 days", "4"),  # a hyphen is no minus sign
        ("#### none\nbut 8 was written earlier: 8", "8"),  # #### without a number: the last one
        ("I don't know", None),
        ("", None),
    ],
)
def test_gsm8k_answer_extraction(text, number):
    assert gsm8k.extract(text) == number


def test_gsm8k_answers_compare_as_numbers():
    assert gsm8k.same(gsm8k.extract("#### 1,234.00"), "1234")
    assert gsm8k.same(gsm8k.extract("$0.50"), gsm8k.normalise("0.5"))
    assert not gsm8k.same(gsm8k.extract("#### 1,235"), "1234")
    assert not gsm8k.same(None, "0")


def test_gsm8k_reads_the_hub_and_the_github_layouts_alike(tmp_path):
    hub = gsm8k.load(gsm_hub_folder(tmp_path / "hub"), 2)
    github = gsm8k.load(gsm_github_folder(tmp_path / "gh"), 2)
    assert hub == github
    test, shots = hub
    assert [p.reference for p in test] == ["1234", "-5", "4.5"]
    assert [s.question for s in shots] == [GSM_TRAIN[0]["question"], GSM_TRAIN[1]["question"]]
    # The config folder itself, and one file with its train split beside it.
    assert gsm8k.load(str(tmp_path / "hub" / "main"), 1) == (test, shots[:1])
    assert gsm8k.load(str(tmp_path / "gh" / "test.jsonl"), 2) == hub
    assert gsm8k.prompt(test[2].question, shots[:1]) == (
        "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\n"
        "Answer: Tom has 3 + 5 = <<3+5=8>>8 apples.\n#### 8\n\n"
        "Question: Half of 9 is what?\nAnswer:"
    )
    assert gsm8k.chat_messages("Q?", shots[:1]) == [
        {"role": "user", "content": GSM_TRAIN[0]["question"]},
        {"role": "assistant", "content": GSM_TRAIN[0]["answer"]},
        {"role": "user", "content": "Q?"},
    ]


def test_gsm8k_data_mistakes_name_the_file_line_and_field(tmp_path, monkeypatch):
    alone = write_jsonl(tmp_path / "only" / "questions.jsonl", GSM_TEST)
    with pytest.raises(DataError, match=r"--shots 8 needs GSM8K's train split beside .*questions.jsonl"):
        gsm8k.load(alone, 8)
    assert len(gsm8k.load(alone, 0)[0]) == 3
    with pytest.raises(DataError, match="--shots 5: the train split has only 3 problems"):
        gsm8k.load(gsm_github_folder(tmp_path / "gh"), 5)
    bad = write_jsonl(tmp_path / "b1.jsonl", [GSM_TEST[0], {"question": "q"}])
    with pytest.raises(DataError, match=r"b1.jsonl:2: missing field 'answer'"):
        gsm8k.load(bad, 0)
    bad = write_jsonl(tmp_path / "b2.jsonl", [{"question": "q", "answer": "it is 4"}])
    with pytest.raises(DataError, match=r"b2.jsonl:1: field 'answer' has no '#### N'"):
        gsm8k.load(bad, 0)
    bad = write_parquet(tmp_path / "b3.parquet", [GSM_TEST[0], {"question": "q", "answer": None}])
    with pytest.raises(DataError, match=r"b3.parquet: row 2: field 'answer' must be text"):
        gsm8k.load(bad, 0)
    (tmp_path / "b4.jsonl").write_text('{"question": "q", "answer": "#### 1"}\nnot json\n')
    with pytest.raises(DataError, match=r"b4.jsonl:2: not valid JSON"):
        gsm8k.load(str(tmp_path / "b4.jsonl"), 0)
    (tmp_path / "lfs.parquet").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(DataError, match=r"lfs.parquet: not a readable Parquet file"):
        gsm8k.load(str(tmp_path / "lfs.parquet"), 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no GSM8K test split"):
        gsm8k.load(str(tmp_path / "empty"), 0)
    hub = gsm_hub_folder(tmp_path / "hub")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(DataError, match=r"reading Parquet needs pyarrow \(pip install pyarrow"):
        gsm8k.load(hub, 0)


def test_gsm8k_downloads_from_the_hub_and_says_what_to_pass_offline(tmp_path, monkeypatch):
    import huggingface_hub

    hub = tmp_path / "hub"
    gsm_hub_folder(hub)
    asked = []

    def download(repo_id, repo_type, filename):
        asked.append((repo_id, repo_type, filename))
        return str(hub / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    test, shots = gsm8k.load(None, 1)
    assert len(test) == 3 and len(shots) == 1
    assert asked == [("openai/gsm8k", "dataset", "main/test-00000-of-00001.parquet"),
                     ("openai/gsm8k", "dataset", "main/train-00000-of-00001.parquet")]  # fmt: skip

    def offline(**_):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(DataError, match=r"gsm8k: could not download .*offline\?\); pass --data"):
        gsm8k.load(None, 8)


# ------------------------------------------------------------------ KoBEST


def test_kobest_reads_every_hub_layout(tmp_path):
    root = kobest_folder(tmp_path / "k")
    for subset in kobest.SUBSETS:
        test, _ = kobest.load(subset, root, alone=False)
        assert [e.label for e in test] == [r["label"] for r in KOBEST[subset]], subset
    _, shots = kobest.load("copa", root, shots=2, alone=False)  # the parquet conversion's train/0000.parquet
    assert [s.fields["premise"] for s in shots] == [r["premise"] for r in KOBEST["copa"][1:]]
    # One task: its own folder, or one file with the train split beside it.
    assert (
        kobest.load("boolq", str(tmp_path / "k" / "boolq"), shots=1)[1][0].label
        == KOBEST["boolq"][-1]["label"]
    )
    assert len(kobest.load("copa", str(tmp_path / "k" / "copa" / "test" / "0000.parquet"), shots=1)[1]) == 1
    with pytest.raises(DataError, match="--shots 1 needs kobest_sentineg's train split"):
        kobest.load("sentineg", root, shots=1, alone=False)
    with pytest.raises(DataError, match=r"no KoBEST boolq test split"):
        kobest.load("boolq", str(tmp_path / "k" / "copa"), alone=False)


def test_kobest_prompts_and_choices():
    def example(subset, i=0):
        row = KOBEST[subset][i]
        return kobest.Example(subset, {c: row[c] for c in kobest.COLUMNS[subset]}, row["label"])

    cases = {
        "boolq": ("세종대왕은 조선의 제4대 왕으로, 1443년에 훈민정음을 창제하였다. 그는 과학과 농업의 발전에도 힘썼다.\n"
                  "질문: 훈민정음은 세종대왕 때 만들어졌는가?\n답변:", ["아니오", "예"]),
        "copa": ("아이가 넘어져서 무릎을 다쳤다. 그래서", ["아이가 울음을 터뜨렸다.", "아이가 노래를 불렀다."]),
        "wic": ("문장 1: 점심을 많이 먹었더니 [배]가 부르다.\n문장 2: 항구에 큰 [배]가 들어왔다.\n"
                "질문: 두 문장에서 '배'의 의미가 같은가?\n답변:", ["아니오", "예"]),
        "hellaswag": ("민수는 냄비에 물을 붓고 가스레인지 불을 켰다. 잠시 후 물이 끓기 시작했다.",
                      ["민수는 라면과 스프를 냄비에 넣었다.", "민수는 냄비를 냉장고에 넣었다.",
                       "민수는 물이 얼 때까지 기다렸다.", "민수는 가스레인지를 창밖으로 던졌다."]),
        "sentineg": ("문장: 이 식당의 음식은 정말 맛있었다.\n감정(긍정 또는 부정):", ["부정", "긍정"]),
    }  # fmt: skip
    for subset, (text, choices) in cases.items():
        assert kobest.prompt(example(subset)) == text, subset
        assert kobest.choices(example(subset)) == choices, subset
    assert kobest.prompt(example("copa", 1)) == "길이 온통 젖어 있었다. 왜냐하면"  # 원인: "because"
    assert kobest.prompt(example("wic", 1)).startswith(
        "문장 1: 밤새 [눈]이 내려 온 세상이 하얗다.\n"
    )  # tab trimmed
    assert kobest.full_prompt(example("sentineg", 1), [example("sentineg", 0)]) == (
        "문장: 이 식당의 음식은 정말 맛있었다.\n감정(긍정 또는 부정): 긍정\n\n"
        "문장: 배송이 너무 늦어서 실망스러웠다.\n감정(긍정 또는 부정):"
    )


def test_kobest_choices_are_tokens_after_one_space(tiny):
    _, tok = qmlx.load(tiny)
    ex = kobest.Example("boolq", {"paragraph": "하늘은 파랗다.", "question": "하늘은 파란가?"}, 1)
    [(context, continuations)] = kobest.items([ex], [], tok, chat=False)
    text = "하늘은 파랗다.\n질문: 하늘은 파란가?\n답변:"
    assert context == tok.encode(text)
    assert continuations == [tok.encode(" 아니오"), tok.encode(" 예")]
    [(context, continuations)] = kobest.items([ex], [], tok, chat=True)
    assert tok.decode(context).endswith("답변:<|im_end|>\n<|im_start|>assistant\n")
    assert continuations == [tok.encode("아니오"), tok.encode("예")]


@pytest.mark.parametrize(
    "subset,row,words",
    [
        ("copa", {**KOBEST["copa"][0], "question": "이유"}, "test.jsonl:1: field 'question' must be 원인 or 결과"),
        ("boolq", {**KOBEST["boolq"][0], "label": 2}, "test.jsonl:1: field 'label' must be an integer 0–1"),
        ("boolq", {**KOBEST["boolq"][0], "label": True}, "field 'label' must be an integer"),
        ("hellaswag", {k: v for k, v in KOBEST["hellaswag"][0].items() if k != "ending_3"},
         "test.jsonl:1: missing field 'ending_3'"),
        ("sentineg", {"sentence": " ", "label": 0}, "test.jsonl:1: field 'sentence' is empty"),
    ],
)  # fmt: skip
def test_bad_kobest_rows_are_named_by_line_and_field(tmp_path, subset, row, words):
    path = write_jsonl(tmp_path / subset / "test.jsonl", [row])
    with pytest.raises(DataError, match=words):
        kobest.load(subset, path)


def _f1_by_precision_and_recall(gold, chosen, c):
    tp = sum(g == p == c for g, p in zip(gold, chosen))
    predicted, actual = chosen.count(c), gold.count(c)
    precision = tp / predicted if predicted else 0.0  # sklearn's zero_division=0
    recall = tp / actual if actual else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def test_macro_f1_against_a_hand_computed_confusion():
    # Class 0: 4 gold, 3 found, 2 of class 1 mistaken for it. Class 1: 6 gold, 4 found.
    gold = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    chosen = [0, 0, 0, 1, 1, 1, 1, 1, 0, 0]
    # P0 = 3/5, R0 = 3/4: F1 = 2/3; P1 = 4/5, R1 = 4/6: F1 = 8/11.
    assert kobest.macro_f1(gold, chosen) == pytest.approx((2 / 3 + 8 / 11) / 2)
    # Four classes, one never chosen (F1 0) and one chosen but never gold (F1 0): the mean over four.
    gold = [0, 0, 1, 1, 2, 2, 2]
    chosen = [0, 1, 1, 1, 0, 3, 0]
    want = sum(_f1_by_precision_and_recall(gold, chosen, c) for c in range(4)) / 4
    assert kobest.macro_f1(gold, chosen) == pytest.approx(want)
    # By hand: P0 = 1/3, R0 = 1/2: F1 = 0.4; P1 = 2/3, R1 = 1: F1 = 0.8; class 2 never chosen, 3 never gold.
    assert want == pytest.approx((0.4 + 0.8 + 0 + 0) / 4)
    gold = [0, 1] * 20
    chosen = [0, 1] * 15 + [1, 0] * 5
    lo, hi = kobest.macro_f1_interval(gold, chosen)
    assert kobest.macro_f1(gold, chosen) == pytest.approx(0.75)  # 30 of 40 right, symmetric: F1 = 0.75 each
    assert 0.5 < lo < 0.75 < hi < 1.0


class Bigram:
    """A fake model whose next-token log-probabilities depend only on the current token (a table)."""

    def __init__(self, table):
        self.table = mx.array(table, dtype=mx.float32)

    def model(self, x):
        return self.table[x]  # the "hidden state" is the row of next-token logits

    def head(self, hidden):
        return hidden


def test_choice_scoring_picks_the_continuation_the_model_finds_likely():
    vocab = 7
    table = np.zeros((vocab, vocab))
    for t in range(vocab):
        table[t, (t + 1) % vocab] = 4.0  # token t is most likely followed by t + 1
    logp = table - np.log(np.exp(table).sum(1, keepdims=True))
    model = Bigram(table)
    items = [
        ([0, 1, 2], [[4], [3], [6]]),  # one-token choices: 3 follows 2
        ([5], [[0, 1, 3], [6, 0, 1], [6, 2]]),  # several tokens: 5 → 6 → 0 → 1 is the chain
    ]
    got = qmlx.eval.choices.continuation_logprobs(model, items, max_batch_tokens=5)
    want = [[logp[2, 4], logp[2, 3], logp[2, 6]],
            [logp[5, 0] + logp[0, 1] + logp[1, 3], logp[5, 6] + logp[6, 0] + logp[0, 1], logp[5, 6] + logp[6, 2]]]  # fmt: skip
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [int(np.argmax(g)) for g in got] == [1, 1]


# ------------------------------------------------------------------ custom JSONL tasks

CUSTOM_LINES = [
    {"id": "capital", "prompt": "The capital of France is", "choices": ["Berlin", "Paris", "Rome"], "answer": "Paris"},
    {"prompt": "Is water wet? Answer:", "choices": ["no", "yes"], "answer": 1},
    {"id": 7, "prompt": "Name the largest planet.", "answer": "Jupiter", "match": "contains"},
    {"prompt": "What is 6 * 7?", "answer": "42", "match": "number", "stop": ["\n"]},
    {"prompt": "Say hello.", "answer": "  Hello   World "},
]  # fmt: skip


def test_custom_lines_of_both_kinds(tmp_path):
    items = custom.load(write_jsonl(tmp_path / "c.jsonl", CUSTOM_LINES))
    assert [(i.id, i.kind, i.answer) for i in items] == [
        ("capital", "choices", 1), ("1", "choices", 1), ("7", "generate", "Jupiter"),
        ("3", "generate", "42"), ("4", "generate", "  Hello   World "),
    ]  # fmt: skip
    assert items[3].stop == ("\n",) and items[2].stop is None and items[2].match == "contains"
    assert custom.correct(items[4], "hello world") and custom.correct(items[4], "\nHELLO\tworld.") is False
    assert custom.correct(items[2], "I think it is jupiter, by far") and not custom.correct(
        items[2], "Saturn"
    )
    assert custom.correct(items[3], "The answer is 42.") and custom.correct(items[3], "#### 42.0")
    assert not custom.correct(items[3], "41")


@pytest.mark.parametrize(
    "line,words",
    [
        ('{"choices": ["a", "b"], "answer": 0}', "c.jsonl:2: missing field 'prompt'"),
        ('{"prompt": "p", "choices": ["a"], "answer": 0}', "c.jsonl:2: field 'choices' must be a list of at least two"),
        ('{"prompt": "p", "choices": "ab", "answer": 0}', "c.jsonl:2: field 'choices' must be a list"),
        ('{"prompt": "p", "choices": ["a", "b"], "answer": 2}', "c.jsonl:2: field 'answer' must be a choice's index 0–1"),
        ('{"prompt": "p", "choices": ["a", "b"], "answer": "c"}', "c.jsonl:2: field 'answer' 'c' is not one of the choices"),
        ('{"prompt": "p", "choices": ["a", "b"]}', "c.jsonl:2: missing field 'answer'"),
        ('{"prompt": "p", "answer": "x", "match": "fuzzy"}', "c.jsonl:2: field 'match' must be one of exact"),
        ('{"prompt": "p", "answer": "many", "match": "number"}', "c.jsonl:2: field 'answer' has no number"),
        ('{"prompt": "p", "answer": "x", "stop": [1]}', "c.jsonl:2: field 'stop' must be"),
        ('{"prompt": "p", "answer": ""}', "c.jsonl:2: field 'answer' must be the expected text"),
        ('{"prompt": 3, "answer": "x"}', "c.jsonl:2: field 'prompt' must be text"),
        ('{"id": "a", "prompt": "p", "answer": "x"}', "c.jsonl:2: field 'id' 'a' repeats line 1"),
        ('["prompt", "answer"]', "c.jsonl:2: not a JSON object"),
        ("{oops", "c.jsonl:2: not valid JSON"),
    ],
)  # fmt: skip
def test_bad_custom_lines_are_named_by_line_and_field(tmp_path, line, words):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "prompt": "q", "answer": "x"}\n' + line + "\n")
    with pytest.raises(DataError, match=words):
        custom.load(str(path))


# ------------------------------------------------------------------ end to end on a tiny model


@pytest.fixture
def counting(monkeypatch):
    """Calls of batch_generate (prompts per call) and continuation_logprobs (items per call)."""
    calls = {"generate": [], "score": []}
    generate, score = qmlx.batch.batch_generate, qmlx.eval.choices.continuation_logprobs

    def counted_generate(model, tok, prompts, *a, **k):
        calls["generate"].append(len(prompts))
        return generate(model, tok, prompts, *a, **k)

    def counted_score(model, items, *a, **k):
        calls["score"].append(len(items))
        return score(model, items, *a, **k)

    monkeypatch.setattr(qmlx.batch, "batch_generate", counted_generate)
    monkeypatch.setattr(qmlx.eval.choices, "continuation_logprobs", counted_score)
    return calls


def test_eval_kobest_end_to_end_and_from_its_cache(tiny, tmp_path, counting, capsys):
    data = kobest_folder(tmp_path / "kobest")
    out = str(tmp_path / "k.json")
    assert main(["eval", "-m", tiny, "--tasks", "kobest", "--data", data, "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "kobest_boolq" in printed and "macro_f1" in printed and "(mean)" in printed
    report = json.load(open(out, encoding="utf-8"))
    names = [f"kobest_{s}" for s in kobest.SUBSETS]
    assert list(report["tasks"]) == [*names, "kobest"]
    assert counting["score"] == [len(KOBEST[s]) for s in kobest.SUBSETS]  # one call per task (one chunk)
    for name in names:
        t = report["tasks"][name]
        rows = KOBEST[name.removeprefix("kobest_")]
        assert t["problems"] == len(rows) and len(t["items"]) == len(rows)
        assert set(t["scores"]) == {"macro_f1", "accuracy"} and t["settings"]["mode"] == "complete"
        for it, row in zip(t["items"], rows):
            assert it["label"] == row["label"] and it["chosen"] == int(np.argmax(it["logprobs"]))
            assert len(it["logprobs"]) == len(it["choices"]) == kobest.CLASSES[name.removeprefix("kobest_")]
        gold, chosen = [i["label"] for i in t["items"]], [i["chosen"] for i in t["items"]]
        assert t["scores"]["macro_f1"]["score"] == pytest.approx(kobest.macro_f1(gold, chosen))
        assert t["scores"]["accuracy"]["score"] == sum(g == c for g, c in zip(gold, chosen)) / len(gold)
    average = report["tasks"]["kobest"]
    assert average["group"] == names and average["problems"] == sum(len(r) for r in KOBEST.values())
    assert average["scores"]["macro_f1"]["score"] == pytest.approx(
        sum(report["tasks"][n]["scores"]["macro_f1"]["score"] for n in names) / 5
    )
    counting["score"].clear()
    assert main(["eval", "-m", tiny, "--tasks", "kobest", "--data", data, "--out", out]) == 0
    assert counting["score"] == []  # every item from the cache
    again = json.load(open(out, encoding="utf-8"))
    assert [again["tasks"][n]["items"] for n in names] == [report["tasks"][n]["items"] for n in names]
    # One task with shots from its train split: other settings, scored afresh.
    assert (
        main(["eval", "-m", tiny, "--tasks", "kobest_boolq", "--data", data, "--shots", "1", "--out", out])
        == 0
    )
    assert counting["score"] == [3]
    capsys.readouterr()
    for argv, words in [
        (["--tasks", "kobest,gsm8k", "--data", data], "--data names one task's data"),
        (["--tasks", "kobest", "--data", str(tmp_path / "kobest" / "sentineg.parquet")], "read a folder"),
        (["--tasks", "kobest_copa", "--data", data, "--shots", "5"], "train split has only 2 examples"),
    ]:
        assert main(["eval", "-m", tiny, *argv]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_eval_gsm8k_with_a_custom_task_end_to_end_and_from_its_cache(tiny, tmp_path, counting, capsys):
    data = gsm_github_folder(tmp_path / "gsm")
    mine = write_jsonl(tmp_path / "mine.jsonl", CUSTOM_LINES)
    out = str(tmp_path / "g.json")
    argv = ["eval", "-m", tiny, "--tasks", f"gsm8k,{mine}", "--data", data, "--shots", "2",
            "--max-tokens", "5", "--out", out]  # fmt: skip
    assert main(argv) == 0
    assert mine in capsys.readouterr().out
    report = json.load(open(out, encoding="utf-8"))
    assert list(report["tasks"]) == ["gsm8k", mine]
    g = report["tasks"]["gsm8k"]
    assert g["problems"] == 3 and g["settings"]["mode"] == "chat" and g["settings"]["shots"] == 2
    assert [set(i) for i in g["items"]] == [
        {"task_id", "sample", "question", "prompt", "output", "extracted", "reference", "correct"}
    ] * 3
    assert [i["reference"] for i in g["items"]] == ["1234", "-5", "4.5"]
    assert all(GSM_TRAIN[1]["answer"] in i["prompt"] and GSM_TRAIN[2]["question"] not in i["prompt"]
               for i in g["items"])  # fmt: skip
    c = report["tasks"][mine]
    assert c["problems"] == 5 and [i["kind"] for i in c["items"]] == ["choices"] * 2 + ["generate"] * 3
    assert set(c["scores"]) == {"accuracy", "choices", "generated"}
    assert c["settings"]["mode"] == "complete" and c["settings"]["generate_mode"] == "chat"
    # gsm8k's 3 prompts in one call; the custom file's generated lines by stop strings (two with the
    # chat template's end, one with its own "\n"); its two choice lines in one scoring call.
    assert sorted(counting["generate"]) == [1, 2, 3] and counting["score"] == [2]
    counting["generate"].clear()
    counting["score"].clear()
    assert main(argv) == 0
    assert counting == {"generate": [], "score": []}
    again = json.load(open(out, encoding="utf-8"))
    assert again["tasks"]["gsm8k"]["items"] == g["items"] and again["tasks"][mine]["items"] == c["items"]
    capsys.readouterr()
    assert main(["eval", "-m", tiny, "--tasks", "gsm8k", "--data", data]) == 2  # the default: 8 shots
    assert "--shots 8: the train split has only 3 problems" in capsys.readouterr().err


def test_gsm8k_grades_what_the_model_generates(tiny, tmp_path, monkeypatch):
    """The generated text goes through extraction and comparison: canned outputs, known verdicts."""
    outputs = {
        "1,200 chickens": "1200 + 34 = 1234 chickens.\n#### 1,234",  # right, with a comma
        "Sam had 10": "10 - 15 = -5, so #### 5",  # wrong sign
        "Half of 9": "I am not sure.",  # no number
    }
    seen = []

    def fake(model, tok, prompts, max_tokens, **kwargs):
        seen.append(kwargs["stop"])
        return [qmlx.batch.BatchResult(text=next(v for k, v in outputs.items() if k in p)) for p in prompts]

    monkeypatch.setattr(qmlx.batch, "batch_generate", fake)
    report = evaluate(tiny, tasks="gsm8k", data=gsm_hub_folder(tmp_path / "hub"), shots=1, mode="complete",
                      progress=False)  # fmt: skip
    t = report["tasks"]["gsm8k"]
    assert [(i["extracted"], i["correct"]) for i in t["items"]] == [
        ("1234", True),
        ("5", False),
        (None, False),
    ]
    assert t["scores"]["accuracy"]["score"] == pytest.approx(1 / 3) and t["no_number"] == 1
    assert t["items"][0]["prompt"].endswith(f"Question: {GSM_TEST[0]['question']}\nAnswer:")
    assert seen == [["Question:"]]


def test_custom_choices_follow_the_scores(tiny, tmp_path, monkeypatch):
    """The chosen index is the highest-scoring choice and is graded against the line's answer."""
    _, tok = qmlx.load(tiny)
    lines = [
        {"prompt": "Pick:", "choices": ["wrong", "right", "wrong again"], "answer": 1},
        {"prompt": "Pick:", "choices": ["right", "wrong"], "answer": "wrong"},
        {"prompt": "Pick:", "choices": ["wrong", "right"], "answer": "right"},
    ]

    def fake(model, items, **_):  # a choice that reads "right" is the likely one
        return [[0.0 if "right" in tok.decode(c) else -3.0 for c in conts] for _, conts in items]

    monkeypatch.setattr(qmlx.eval.choices, "continuation_logprobs", fake)
    path = write_jsonl(tmp_path / "pick.jsonl", lines)
    t = evaluate(tiny, tasks=path, progress=False)["tasks"][path]
    assert [(i["chosen"], i["correct"]) for i in t["items"]] == [(1, True), (0, False), (1, True)]
    assert t["scores"]["accuracy"]["score"] == pytest.approx(2 / 3) and set(t["scores"]) == {"accuracy"}

"""Chat-message records (HF datasets' / OpenAI's {"messages": [...]}), conversation prompts in rankings and
pairs, and Parquet files beside JSONL (issue 20)."""

import json

import pytest
from fastrlhf.data import encode_chat, encode_prompt, load_tokenizer
from fastrlhf.data.formats import FormatError, Ranking, SFTExample, read_rankings, read_sft, write_rankings
from fastrlhf.data.messages import Turn
from helpers.hf_tokenizers import save_transformers_folder

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]
CONVERSATION = tuple(Turn(m["role"], m["content"]) for m in CHAT[:4])


def jsonl(tmp_path, *objs, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def parquet(tmp_path, rows, name="data.parquet"):
    path = tmp_path / name
    keys = list(dict.fromkeys(k for row in rows for k in row))  # from_pylist takes its columns from row 0
    pq.write_table(pa.Table.from_pylist([{k: row.get(k) for k in keys} for row in rows]), path)
    return path


def test_each_assistant_turn_of_a_conversation_is_an_example(tmp_path):
    got = read_sft(jsonl(tmp_path, {"messages": CHAT}, {"prompt": "Hi", "response": "Hello"}))
    assert got == [
        SFTExample(CONVERSATION[:2], "4"),
        SFTExample(CONVERSATION, "6"),
        SFTExample("Hi", "Hello"),
    ]


def test_rankings_and_pairs_take_a_conversation_prompt_and_round_trip(tmp_path):
    pair = {"prompt": CHAT[:4], "chosen": "6", "rejected": "7"}
    ranking = {"prompt": CHAT[:2], "responses": ["4", "5", "four"], "ranking": [0, 2, 1]}
    got = read_rankings(jsonl(tmp_path, pair, ranking))
    assert got[0] == Ranking(CONVERSATION, ("6", "7"), (0, 1))
    assert got[1].prompt == CONVERSATION[:2] and got[1].pairs() == [(0, 2), (0, 1), (2, 1)]
    write_rankings(tmp_path / "again.jsonl", got)
    assert read_rankings(tmp_path / "again.jsonl") == got
    assert json.loads((tmp_path / "again.jsonl").read_text().splitlines()[0])["prompt"] == CHAT[:4]
    assert {r.prompt for r in got} == {CONVERSATION, CONVERSATION[:2]}  # hashable, as prompt keys


def test_parquet_reads_as_jsonl_does_with_mixed_record_kinds(tmp_path):
    rows = [
        {"prompt": "p1", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
        {"prompt": "p2", "chosen": "x", "rejected": "y"},
    ]
    assert read_rankings(parquet(tmp_path, rows)) == read_rankings(jsonl(tmp_path, *rows))
    sft = [{"messages": CHAT}, {"messages": CHAT[:3]}]
    assert read_sft(parquet(tmp_path, sft, "sft.parquet")) == read_sft(
        jsonl(tmp_path, *sft, name="sft.jsonl")
    )


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"messages": CHAT[:2]}, "needs an assistant turn after a user turn"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "needs an assistant turn after a user turn"),
        ({"messages": [{"role": "user", "text": "hi"}]}, r"messages\[0\] must be an object with exactly"),
        ({"messages": [{"role": "robot", "content": "hi"}, CHAT[2]]}, r"messages\[0\] needs a role in"),
        ({"messages": []}, "must be a non-empty list"),
        ({"prompt": CHAT[:3], "response": "x"}, "must not end with an assistant turn"),
        ({"prompt": [CHAT[0]], "response": "x"}, "needs a user turn"),
        ({"prompt": 3, "response": "x"}, "prompt must be a non-empty list"),
    ],
)
def test_bad_conversations_are_named_by_file_and_line(tmp_path, record, match):
    path = jsonl(tmp_path, {"prompt": "ok", "response": "ok"}, record)
    with pytest.raises(FormatError, match=match) as e:
        read_sft(path)
    assert str(e.value).startswith(f"{path}:2: ")


def test_a_bad_parquet_row_is_named_by_row(tmp_path):
    path = parquet(tmp_path, [RANK_OK := {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]},
                              {**RANK_OK, "ranking": [0, 0]}])  # fmt: skip
    with pytest.raises(FormatError, match=r"data.parquet: row 2: ranking must be a permutation"):
        read_rankings(path)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="junk.parquet is not a readable Parquet file"):
        read_rankings(tmp_path / "junk.parquet")


def test_a_conversation_prompt_is_encoded_with_the_chat_template_or_as_plain_lines(tmp_path):
    tok = load_tokenizer(save_transformers_folder("smollm2", tmp_path))
    assert encode_prompt(tok, CONVERSATION) == tok.apply_chat_template(CHAT[:4], add_generation_prompt=True)
    ids, mask = encode_chat(tok, CONVERSATION, "6")
    assert ids[: len(encode_prompt(tok, CONVERSATION))] == encode_prompt(tok, CONVERSATION)
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "6" + tok.decode([tok.eot_id])
    assert encode_prompt(tok, "What is 2+2?") == encode_prompt(tok, (Turn("user", "What is 2+2?"),))
    from fastrlhf.data import format_prompt

    assert format_prompt(CONVERSATION) == (
        "Prompt: system: Be brief.\nuser: What is 2+2?\nassistant: 4\nuser: And 3+3?\nResponse:"
    )

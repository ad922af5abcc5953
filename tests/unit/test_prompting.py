"""The gateway's torch-free prompt path must produce exactly the IDs transformers would."""

from pathlib import Path

from transformers import AutoTokenizer

from inferlog.messages import ChatMessage
from inferlog.prompting import PromptFormatter

CHATS = [
    [ChatMessage(role="user", content="What is the capital of France?")],
    [ChatMessage(role="system", content="Be terse."), ChatMessage(role="user", content="Hi"),
     ChatMessage(role="assistant", content="Hello."), ChatMessage(role="user", content="Ünïcödé ✓ 東京")],
]


def test_chat_ids_match_transformers(smol_dir: Path) -> None:
    ours = PromptFormatter(smol_dir)
    theirs = AutoTokenizer.from_pretrained(smol_dir)
    for chat, ids in zip(CHATS, ours.encode_chats(CHATS), strict=True):
        expected = theirs.apply_chat_template([m.model_dump() for m in chat], add_generation_prompt=True,
                                              tokenize=True)
        if not isinstance(expected, list):
            expected = expected["input_ids"]
        assert ids == expected


def test_decode_round_trips_and_eos_is_known(smol_dir: Path) -> None:
    ours = PromptFormatter(smol_dir)
    [ids] = ours.encode_prompts(["Paris is in France."])
    assert ours.decode(ids) == "Paris is in France."
    assert ours.eos_token_id == AutoTokenizer.from_pretrained(smol_dir).eos_token_id

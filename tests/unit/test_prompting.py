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


def test_incremental_decoding_gives_what_decoding_the_whole_list_gives(smol_dir: Path) -> None:
    ours = PromptFormatter(smol_dir)
    texts = ["Héllo wörld — naïve café 😀🚀 日本語のテキスト", "  leading spaces\n\nand\ttabs", "<|im_end|> special"]
    arbitrary = list(range(0, 49152, 97))  # any tokens, invalid UTF-8 byte runs included
    for ids in ours.encode_prompts(texts) + [arbitrary]:
        decoder = ours.decoder()
        for k in range(1, len(ids) + 1):
            # each step is fed the list so far, as the engine's streaming outputs carry it
            assert ours.decode(ids[:k]).startswith(decoder.extend(ids[:k]))
            # a character split across tokens is held back, not garbled
            assert ids is arbitrary or "\ufffd" not in decoder.text
        assert decoder.text == ours.decode(ids)
    [emoji] = ours.encode_prompts(["😀"])
    assert len(emoji) > 1 and ours.decoder().extend(emoji[:1]) == ""  # its first byte alone is no text yet

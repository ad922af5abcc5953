from inferlog_gateway.errors import param_of


def test_param_names_follow_openai_style() -> None:
    assert param_of(("body", "messages", 0, "role")) == "messages[0].role"
    assert param_of(("body", "max_tokens")) == "max_tokens"
    assert param_of(("body",)) is None

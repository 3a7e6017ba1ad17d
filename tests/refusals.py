"""The check every refusal test makes: the call is refused with the right error, and its message,
which says what is wrong and what to do, is one line."""
import pytest


def one_line(excinfo) -> str:
    """The refusal's message (``pytest.raises``' ``excinfo``), asserted to be one line."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def refuses(err, what, fn, *args, **kwargs) -> str:
    """``fn(*args, **kwargs)`` refused with ``err``, its message matching ``what``, on one line."""
    with pytest.raises(err, match=what) as e:
        fn(*args, **kwargs)
    return one_line(e)

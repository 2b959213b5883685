"""Choosing an implementation of a backend in tests."""

from fastprefix import dispatch


def select_backend(param: str, monkeypatch) -> str:
    """The backend name for a test param: "torch" picks its implementation as it would in use (torch-flash
    unless dropout or a bias gradient needs torch-explicit); "torch-explicit" takes torch-flash out of the
    dispatcher for the rest of the test, leaving the implementation non-CPU devices get."""
    name, _, only = param.partition("-")
    if only:
        kept = tuple(i for i in dispatch.IMPLEMENTATIONS if i.backend != name or i.name == param)
        monkeypatch.setattr(dispatch, "IMPLEMENTATIONS", kept)
    return name

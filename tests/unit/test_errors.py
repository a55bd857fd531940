"""The refusal hierarchy and the codes derived from it."""

from __future__ import annotations

from sidecar import errors, metrics
from sidecar.errors import ERROR_CODES, SidecarError


def test_every_refusal_class_in_errors_py_has_its_code_listed_once() -> None:
    # Grandchildren included: every code a refusal class carries, at any depth, is listed
    # (a subclass that keeps its parent's code, once), and metrics.py pre-labels a child
    # for each: an unlisted code would be counted as internal_error.
    classes = [
        c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, SidecarError) and c is not SidecarError
    ]
    assert len(classes) == 16
    assert set(ERROR_CODES) == {c.code for c in classes}
    assert len(ERROR_CODES) == len(set(ERROR_CODES))
    assert SidecarError.code not in ERROR_CODES  # internal_error has its own place
    assert set(metrics._DENIED) == {*ERROR_CODES, SidecarError.code}

"""The renamed `window` fields (issue 21: one name per meaning): ZipAR's `lag` and `min_lag`, SJD's
`jacobi_window`, the quantized KV methods' `buffer_len`. The old keyword and attribute still work for one release,
each warning once per process; both spellings at once are refused."""

import dataclasses
import inspect
import warnings

import pytest

from zipjax import deprecation, kv, zipar
from zipjax.errors import ZipjaxError

RENAMED = [(zipar.FixedWindow, "window", "lag", 3), (zipar.AdaptiveWindow, "min_window", "min_lag", 2),
           (zipar.SJD, "window", "jacobi_window", 8), (kv.ZipCache, "window", "buffer_len", 16),
           (kv.ZipVL, "window", "buffer_len", 16), (kv.Uniform, "window", "buffer_len", 16)]


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(deprecation, "_warned", set())


@pytest.mark.parametrize(("cls", "old", "new", "value"), RENAMED, ids=lambda x: getattr(x, "__name__", None))
def test_the_old_name_reaches_the_new_field_and_warns_once(cls, old, new, value):
    assert new in inspect.signature(cls).parameters and old not in inspect.signature(cls).parameters
    assert [f.name for f in dataclasses.fields(cls) if f.name in (old, new)] == [new]
    with pytest.warns(DeprecationWarning, match=rf"{cls.__name__}\({old}=\.\.\.\) is deprecated: it is "
                                                rf"{cls.__name__}\({new}=\.\.\.\)"):
        made = cls(**{old: value})
    assert made == cls(**{new: value}) and getattr(made, new) == value
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cls(**{old: value}) == made  # once per process: no second warning
    assert not caught
    with pytest.warns(DeprecationWarning, match=rf"{cls.__name__}\.{old} is deprecated: it is {cls.__name__}\.{new}"):
        assert getattr(made, old) == value
    with pytest.raises(ZipjaxError, match=rf"{cls.__name__} takes {new}= \(formerly {old}=\), not both"):
        cls(**{old: value, new: value})
    assert f"{new}={value}" in repr(made) and f"({old}=" not in repr(made) and f" {old}=" not in repr(made)


def test_the_new_names_are_validated_by_their_own_name():
    for make, message in [(lambda: zipar.FixedWindow(0), "FixedWindow lag must be a positive integer"),
                          (lambda: zipar.AdaptiveWindow(min_lag=0), "AdaptiveWindow min_lag must be a positive"),
                          (lambda: zipar.SJD(1), "SJD jacobi_window must be >= 2"),
                          (lambda: kv.ZipCache(buffer_len=0), "buffer_len must be a positive integer"),
                          (lambda: kv.Uniform(buffer_len=-1), "buffer_len must be a positive integer")]:
        with pytest.raises(ZipjaxError, match=message):
            make()


def test_a_method_by_name_takes_the_old_keyword():
    with pytest.warns(DeprecationWarning, match="ZipVL"):
        assert kv.method_from_name("zipvl", window=8) == kv.ZipVL(buffer_len=8)
    assert kv.method_from_name("zipcache", buffer_len=8).decode_slots == 8

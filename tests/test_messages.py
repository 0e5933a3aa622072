"""utils.messages.name_some: the short list that error messages show."""
from utils.messages import name_some


def test_name_some():
    assert name_some([]) == ""
    assert name_some(["a", "b", "c"]) == "a, b, c"
    assert name_some(range(5)) == "0, 1, 2, 3, 4"
    assert name_some(range(12)) == "0, 1, 2, 3, 4, ... and 7 more"
    assert name_some((f"k{i}" for i in range(12)), limit=10).endswith("k9, ... and 2 more")

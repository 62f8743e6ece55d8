"""Generated blocks of README.md: the text between two marker comments."""


def read_readme_block(path, start, end):
    """The text of ``path`` between the markers ``start`` and ``end``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    i, j = text.index(start) + len(start), text.index(end)
    assert i <= j, "README markers out of order"
    return text[i:j]


def write_readme_block(path, start, end, block):
    """Put ``block`` between the markers ``start`` and ``end`` of ``path``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    i, j = text.index(start) + len(start), text.index(end)
    new = text[:i] + block + text[j:]
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)

"""Unicode clean-up before any guardrail rule or model sees a text.

Typed chat can hide a word from a pattern with invisible or look-alike characters: a zero-width space
(``A\\u200btemnot``), a soft hyphen, fullwidth letters, a decomposed umlaut, a Cyrillic ``а``. ``clean_text``
undoes that: NFKC (fullwidth → ASCII, ligatures split, ``a`` + combining diaeresis → ``ä``), format and
control characters dropped, and the Cyrillic and Greek letters that look like Latin ones folded to Latin.
The folding is blunt on purpose: knotd talks German, and a word that mixes scripts is a disguise.
"""

from __future__ import annotations

import unicodedata

# Cyrillic and Greek letters drawn like Latin ones (lower and upper case).
_CONFUSABLES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "ë", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "і": "i", "ї": "ï", "ј": "j", "ѕ": "s", "ԁ": "d", "ӏ": "l", "ԛ": "q",
    "ԝ": "w", "һ": "h",
    "А": "A", "В": "B", "Е": "E", "Ё": "Ë", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C",
    "Т": "T", "У": "Y", "Х": "X", "І": "I", "Ї": "Ï", "Ј": "J", "Ѕ": "S", "Ԁ": "D", "Ӏ": "I",
    "α": "a", "ο": "o", "ν": "v", "ρ": "p", "τ": "t", "υ": "u", "κ": "k", "ι": "i", "ϲ": "c",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O",
    "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
})
_KEEP_CONTROLS = frozenset("\n\t")


def clean_text(text: str) -> str:
    """``text`` with Unicode disguises removed; case, umlauts and punctuation are kept."""
    text = unicodedata.normalize("NFKC", text)
    if text.isascii() and text.isprintable():
        return text
    text = "".join(ch for ch in text if ch in _KEEP_CONTROLS or unicodedata.category(ch) not in ("Cf", "Cc"))
    if not text.isascii():
        text = text.translate(_CONFUSABLES)
        # Folding can leave a letter + combining mark that NFKC would join ("е" + U+0308 → "ë").
        text = unicodedata.normalize("NFKC", text)
    return text

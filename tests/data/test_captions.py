from bita.data.captions import clean_caption, usable_captions


def test_clean_caption_applies_spec_rules():
    raw = 'Many  Planes (3) are parked: "near" a #building; ~ok! *yes* .'
    assert clean_caption(raw) == "many planes 3 are parked near a building ok yes"


def test_clean_caption_keeps_at_most_max_words():
    assert clean_caption("a b c d e", max_words=3) == "a b c"
    assert len(clean_caption(" ".join(["w"] * 80)).split()) == 50


def test_usable_captions_drops_placeholders_without_letters():
    assert usable_captions([" .", "1 .", "A Bridge .", ""]) == ["a bridge"]

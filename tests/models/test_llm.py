import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from bita.models.llm import IGNORE_INDEX, PrefixLM, build_prefix_lm


@pytest.fixture
def lm(tiny_cfg):
    torch.manual_seed(0)
    return build_prefix_lm(tiny_cfg.llm).eval()


def test_caption_tokenizer_has_newline_and_special_tokens(caption_tokenizer):
    tok = AutoTokenizer.from_pretrained(caption_tokenizer)
    assert len(tok("\n", add_special_tokens=False).input_ids) == 1
    assert None not in (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    ids = tok("many cars are parked\n", add_special_tokens=False).input_ids
    assert tok.decode(ids) == "many cars are parked\n"
    assert tok.decode(tok("zebra ünïcode", add_special_tokens=False).input_ids) == "zebra ünïcode"


def test_labels_skip_bos_prompt_and_padding_and_prompt_keeps_its_space(lm):
    ids, mask, labels = lm.tokenize_captions(["many cars", "a river runs here"], "a photo of ", 32)
    prompt_len = 1 + len(lm.tokenizer("a photo of", add_special_tokens=False).input_ids)
    assert (labels[:, :prompt_len] == IGNORE_INDEX).all()
    assert (labels[mask == 0] == IGNORE_INDEX).all() and (mask[0] == 0).any()
    caption = labels[0][labels[0] != IGNORE_INDEX]
    assert lm.tokenizer.decode(caption) == " many cars\n"
    assert lm.tokenizer.decode(ids[0, 1 : int(mask[0].sum())]) == "a photo of many cars\n"


def test_caption_tokens_are_truncated_but_keep_the_end_token(lm):
    _, mask, labels = lm.tokenize_captions(["a river runs through green fields"], "", 3)
    assert int((labels != IGNORE_INDEX).sum()) == 3 and labels[0, -1] == lm.caption_end_id


def test_prefix_loss_counts_only_caption_tokens(lm):
    captions, prompt = ["many cars", "a river runs through green fields"], "a photo of "
    prefix = torch.randn(2, 3, lm.hidden_size)
    loss = lm.prefix_loss(prefix, captions, prompt)
    ids, mask, labels = lm.tokenize_captions(captions, prompt, 32)
    inputs = torch.cat([prefix, lm.model.get_input_embeddings()(ids)], 1)
    full_mask = torch.cat([torch.ones(2, 3, dtype=torch.long), mask], 1)
    logits = lm.model(inputs_embeds=inputs, attention_mask=full_mask).logits[:, 3:]
    keep = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t+1
    expected = F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep])
    torch.testing.assert_close(loss, expected)
    # a prefix token is never a target, and changing padding ids changes nothing
    ids2 = ids.masked_fill(mask == 0, 7)
    inputs2 = torch.cat([prefix, lm.model.get_input_embeddings()(ids2)], 1)
    logits2 = lm.model(inputs_embeds=inputs2, attention_mask=full_mask).logits[:, 3:]
    torch.testing.assert_close(logits2[:, :-1][keep], logits[:, :-1][keep])


def test_prefix_loss_and_gradient_match_transformers_loss_over_full_logits(lm):
    """Logits only on labelled positions must give the loss and gradients of the LM's own loss
    over every position (prefix, bos, prompt and padding masked out with -100)."""
    captions, prompt = ["many cars", "a river runs through green fields", "boats"], "a photo of "
    prefix = torch.randn(3, 4, lm.hidden_size, requires_grad=True)
    loss = lm.prefix_loss(prefix, captions, prompt)
    (grad,) = torch.autograd.grad(loss, prefix)

    ids, mask, labels = lm.tokenize_captions(captions, prompt, 32)
    inputs = torch.cat([prefix, lm.model.get_input_embeddings()(ids)], 1)
    reference = lm.model(
        inputs_embeds=inputs,
        attention_mask=torch.cat([torch.ones(3, 4, dtype=torch.long), mask], 1),
        labels=torch.cat([torch.full((3, 4), IGNORE_INDEX), labels], 1),
    ).loss
    (reference_grad,) = torch.autograd.grad(reference, prefix)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(grad, reference_grad)


def test_prefix_loss_label_smoothing_mixes_in_the_uniform_target(lm):
    """Smoothing eps: (1 - eps) x the caption tokens' cross-entropy + eps x their mean
    cross-entropy against every vocabulary entry."""
    captions, prompt = ["many cars", "a river runs through green fields"], "a photo of "
    prefix = torch.randn(2, 3, lm.hidden_size)
    plain = lm.prefix_loss(prefix, captions, prompt)
    smoothed = lm.prefix_loss(prefix, captions, prompt, label_smoothing=0.1)
    logits, _, _ = lm._prefixed_logits(prefix, captions, prompt, 32)
    uniform = -F.log_softmax(logits, dim=-1).mean()
    torch.testing.assert_close(smoothed, 0.9 * plain + 0.1 * uniform)
    assert uniform > plain


def test_caption_loss_matches_transformers_loss(lm):
    captions = ["many cars", "a river runs through green fields"]
    ids, mask, labels = lm.tokenize_captions(captions, "", 32)
    reference = lm.model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(lm.caption_loss(captions), reference)


def test_beam_search_with_one_beam_equals_greedy(lm):
    torch.manual_seed(1)
    prefix = torch.randn(2, 3, lm.hidden_size)
    decoded = lm.generate(prefix, "a photo of ", num_beams=1, max_new_tokens=6, min_new_tokens=0)
    head = torch.tensor(lm._heads("a photo of ", None, 1))
    embed = lm.model.get_input_embeddings()
    for row, text in zip(prefix, decoded, strict=True):
        inputs, out = torch.cat([row[None], embed(head)], 1), []
        for _ in range(6):
            token = int(lm.model(inputs_embeds=inputs).logits[0, -1].argmax())
            if token == lm.caption_end_id:
                break
            out.append(token)
            inputs = torch.cat([inputs, embed(torch.tensor([[token]]))], 1)
        assert text == lm.tokenizer.decode(out, skip_special_tokens=True).strip()
    beams = lm.generate(prefix, "", num_beams=3, max_new_tokens=5, min_new_tokens=2)
    assert len(beams) == 2 and all(isinstance(t, str) for t in beams)


def test_caption_lm_stage_api_trains_and_save_pretrained_round_trips(tiny_cfg, tmp_path):
    cfg = tiny_cfg.llm.copy()
    cfg.trainable = True
    lm = PrefixLM.from_config(cfg)
    assert all(p.requires_grad for p in lm.parameters()) and lm.flops_per_sample() > 0
    loss = lm(["many cars are parked", "a river runs"])["loss"]
    loss.backward()
    assert torch.isfinite(loss) and lm.model.get_input_embeddings().weight.grad is not None
    lm.save_pretrained(tmp_path)
    cfg.pretrained = cfg.tokenizer = str(tmp_path)
    again = build_prefix_lm(cfg)
    assert not any(p.requires_grad for p in build_prefix_lm(tiny_cfg.llm).parameters())
    ids = torch.tensor([[1, 5, 9]])
    lm.eval(), again.eval()
    torch.testing.assert_close(again.model(input_ids=ids).logits, lm.model(input_ids=ids).logits)


def test_missing_tokenizer_points_at_the_lm_stage(tiny_cfg):
    cfg = tiny_cfg.llm.copy()
    cfg.tokenizer = None
    with pytest.raises(ValueError, match="stage=lm"):
        build_prefix_lm(cfg)


def test_hub_lm_offline_fails_with_a_clear_message(compose):
    with pytest.raises(OSError, match="(?s)llm.tokenizer='facebook/opt-2.7b'.*network"):
        build_prefix_lm(compose("tiny", "tiny", "opt_2.7b").llm)


def test_caption_tokens_are_the_same_with_or_without_a_prompt(lm):
    """The lm stage and stage 2 use no prompt, fine-tuning does: the caption must not change."""
    _, _, alone = lm.tokenize_captions(["many cars are parked"], "", 32)
    _, _, prompted = lm.tokenize_captions(["many cars are parked"], "a photo of ", 32)
    assert alone[alone != -100].tolist() == prompted[prompted != -100].tolist()


def test_retrieved_context_sits_after_bos_and_carries_no_labels(lm):
    """With retrieval the row is the plain row with each image's retrieved captions inserted
    after bos (each cut to max_tokens and ended by the caption-end token), and the labels are
    still exactly the caption's tokens."""
    retrieved = [["many cars are parked in a parking lot near a building"], ["trees", "a river"]]
    contexts = lm.context_ids(retrieved, max_tokens=3)
    end = lm.caption_end_id
    assert len(contexts[0]) == 4 and contexts[0][-1] == end
    assert lm.tokenizer.decode(*lm.context_ids([["trees", "a river"]], 8)) == " trees\n a river\n"
    captions, prompt = ["many cars", "a river runs here"], "a photo of "
    ids, mask, labels = lm.tokenize_captions(captions, prompt, 32, contexts)
    plain_ids, plain_mask, plain_labels = lm.tokenize_captions(captions, prompt, 32)
    for row, context in enumerate(contexts):
        real, plain_real = int(mask[row].sum()), int(plain_mask[row].sum())
        plain_row = plain_ids[row, :plain_real].tolist()
        assert ids[row, :real].tolist() == plain_row[:1] + context + plain_row[1:]
        assert (mask[row, real:] == 0).all()
        kept = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert kept == plain_labels[row][plain_labels[row] != IGNORE_INDEX].tolist()
        assert (labels[row, : real - len(kept)] == IGNORE_INDEX).all()
    prefix = torch.randn(2, 3, lm.hidden_size)
    assert lm.prefix_loss(prefix, captions, prompt, contexts=contexts) != lm.prefix_loss(
        prefix, captions, prompt
    )


def test_decoding_pads_each_rows_text_on_its_left_after_the_prefix(lm):
    contexts = lm.context_ids([["a river"], [], ["many cars are parked", "trees"]], 4)
    prefix = torch.randn(3, 2, lm.hidden_size)
    inputs, mask = lm._decoding_inputs(prefix, "a photo of ", contexts, 0, 6)
    heads = lm._heads("a photo of ", contexts, 3)
    longest = max(len(h) for h in heads)
    assert inputs.shape[1] == mask.shape[1] == 2 + longest
    assert (mask[:, :2] == 1).all() and (mask[:, -1] == 1).all()
    assert mask.sum(1).tolist() == [2 + len(h) for h in heads]
    assert lm._decoding_inputs(prefix, "a photo of ", None, 0, 6)[1] is None
    wide, wide_mask = lm._decoding_inputs(prefix, "a photo of ", contexts, 30, 6)
    assert (
        wide.shape[1] == 2 + len(heads[1]) + 30
        and wide_mask.sum(1).tolist() == mask.sum(1).tolist()
    )


def test_a_sequence_past_the_lms_positions_names_the_options(lm):
    contexts = lm.context_ids([["many cars are parked"] * 40], 32)
    with pytest.raises(ValueError, match="model.retrieval.k.*max_position_embeddings|max_pos"):
        lm.prefix_loss(torch.randn(1, 3, lm.hidden_size), ["a river"], "", contexts=contexts)

"""FrozenLM: placeholder expansion, merge with count checks, target-only loss, cached generation."""

import pytest
import torch

from mmkit.llm import FrozenLM
from mmkit.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def lm():
    return FrozenLM(tiny_llama(), tiny_tokenizer())


def test_frozen_and_eval(lm):
    assert not any(p.requires_grad for p in lm.parameters())
    lm.train()
    assert not lm.model.training


def test_placeholder_expansion_and_labels(lm):
    batch = lm.build_batch(["describe <image> caption :", "<image> what colour ?"], 4, targets=["a red circle", "red"])
    assert batch.image_mask.sum(1).tolist() == [4, 4]
    row0 = batch.input_ids[0][batch.attention_mask[0].bool()]
    assert batch.image_mask[0, 1:5].all() and not batch.image_mask[0, 0]  # "describe" then 4 slots
    # loss only on the target tokens and eos
    labels = batch.labels[0][batch.labels[0] != -100]
    assert labels.tolist() == lm.target_ids("a red circle")
    assert labels[-1] == lm.eos_token_id
    assert row0[-len(labels):].tolist() == labels.tolist()
    # right padding for training, left padding for generation
    assert batch.attention_mask[0, -1] == 1 and batch.attention_mask[1, -1] == 0
    gen = lm.build_batch(["describe <image> caption :", "<image> what colour ?"], 4)
    assert gen.labels is None and (gen.attention_mask[:, -1] == 1).all()


def test_placeholder_count_errors(lm):
    with pytest.raises(ValueError, match="placeholders for 1 image"):
        lm.build_batch(["no image here"], 4)
    with pytest.raises(ValueError, match="placeholders"):
        lm.build_batch(["<image> <image> two"], 4)
    batch = lm.build_batch(["<image> caption :"], 4)
    with pytest.raises(ValueError, match="4 image positions but the connector gave 6"):
        lm.embed(batch, torch.randn(1, 6, lm.hidden_size))
    with pytest.raises(ValueError, match="hidden size"):
        lm.embed(batch, torch.randn(1, 4, lm.hidden_size + 1))


def test_merge_places_image_embeddings(lm):
    batch = lm.build_batch(["describe <image> caption :"], 3)
    img = torch.randn(1, 3, lm.hidden_size)
    embeds = lm.embed(batch, img)
    assert torch.equal(embeds[0, batch.image_mask[0]], img[0])
    text = lm.model.get_input_embeddings()(batch.input_ids)
    assert torch.equal(embeds[0, ~batch.image_mask[0]], text[0, ~batch.image_mask[0]])


def test_loss_gradient_reaches_image_embeddings_only_through_targets(lm):
    batch = lm.build_batch(["<image> caption :"] * 2, 3, targets=["a red circle", "a blue star"])
    img = torch.randn(2, 3, lm.hidden_size, requires_grad=True)
    loss = lm.caption_loss(batch, img)
    loss.backward()
    assert loss.item() > 0 and img.grad.abs().sum() > 0
    # the loss equals a manual cross-entropy over target positions
    logits = lm.model(inputs_embeds=lm.embed(batch, img.detach()), attention_mask=batch.attention_mask).logits
    lab = batch.labels[:, 1:]
    keep = lab != -100
    manual = torch.nn.functional.cross_entropy(logits[:, :-1][keep], lab[keep])
    assert torch.allclose(loss, manual, atol=1e-5)


def _greedy_without_cache(lm, batch, img, steps):
    embeds = lm.embed(batch, img)
    mask = batch.attention_mask
    out = []
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[:, -1]
        tok = logits.argmax(-1)
        out.append(tok)
        embeds = torch.cat([embeds, lm.model.get_input_embeddings()(tok)[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


def test_cached_generation_matches_recomputation_and_batching(lm):
    prompts = ["describe <image> caption :", "<image> what colour is the circle ?"]
    img = torch.randn(2, 3, lm.hidden_size) * 0.5
    batch = lm.build_batch(prompts, 3)
    ids = lm.generate_ids(batch, img, max_new_tokens=6, stop_at_eos=False)
    assert torch.equal(ids, _greedy_without_cache(lm, batch, img, 6))
    # batched (left-padded) generation == one prompt at a time
    for i, p in enumerate(prompts):
        single = lm.generate_ids(lm.build_batch([p], 3), img[i : i + 1], max_new_tokens=6, stop_at_eos=False)
        assert torch.equal(single[0], ids[i])
    texts = lm.generate(batch, img, max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_sampling_is_seeded(lm):
    batch = lm.build_batch(["<image> caption :"], 3)
    img = torch.randn(1, 3, lm.hidden_size)
    a = lm.generate_ids(batch, img, max_new_tokens=5, do_sample=True, top_p=0.9,
                        generator=torch.Generator().manual_seed(3), stop_at_eos=False)
    b = lm.generate_ids(batch, img, max_new_tokens=5, do_sample=True, top_p=0.9,
                        generator=torch.Generator().manual_seed(3), stop_at_eos=False)
    assert torch.equal(a, b)


def test_chat_template_and_text_features(lm):
    chat = FrozenLM(lm.model, lm.tokenizer, chat_template=True)
    text = chat.format_prompt("<image> what colour ?")
    assert text.startswith("<s> user :") and "<image>" in text
    ids, is_img = chat.prompt_ids("<image> what colour ?", 2)
    assert sum(is_img) == 2
    plain = FrozenLM(lm.model, lm.tokenizer, text_feature_memo=0)
    feats = plain.text_features(["a red circle", "a blue star ."])
    assert feats.shape == (2, lm.hidden_size)
    # padding does not change a text's features
    alone = plain.text_features(["a red circle"])
    assert torch.allclose(feats[0], alone[0], atol=1e-5)


def test_text_feature_memo_runs_only_new_texts(lm):
    memo = FrozenLM(lm.model, lm.tokenizer, text_feature_memo=2)
    batch_sizes = []
    hook = lm.model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        first = memo.text_features(["a red circle", "a blue star .", "a red circle"])
        again = memo.text_features(["a blue star .", "a red circle "])  # stripped text is the key
        assert batch_sizes == [2]  # the repeat inside the first call and the whole second call: no LM run
        assert torch.equal(again, first[[1, 0]]) and torch.equal(first[0], first[2])
        memo.text_features(["a green square"])  # evicts the least recently used ("a blue star .")
        assert list(memo._memo) == ["a red circle", "a green square"] and batch_sizes == [2, 1]
    finally:
        hook.remove()
    plain = FrozenLM(lm.model, lm.tokenizer, text_feature_memo=0).text_features(["a red circle"])
    assert torch.allclose(plain[0], first[0], atol=1e-5)
    assert memo.text_features([]).shape == (0, lm.hidden_size)
    with pytest.raises(ValueError, match="text_feature_memo"):
        FrozenLM(lm.model, lm.tokenizer, text_feature_memo=-1)


def test_caption_token_ids_match_what_text_features_encodes(lm):
    ids = lm.caption_token_ids("  a red circle\n")
    assert ids == lm.tokenizer(" a red circle", add_special_tokens=False)["input_ids"]
    # text_features of the unstripped caption equals the mean hidden state of exactly those ids
    plain = FrozenLM(lm.model, lm.tokenizer, text_feature_memo=0)
    hidden = lm.model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state.mean(1)
    torch.testing.assert_close(plain.text_features(["  a red circle\n"]), hidden)


# ---------------------------------------------------------------- ragged image tokens, hidden states
def test_ragged_image_token_counts_match_per_sample_batches():
    lm = FrozenLM(tiny_llama(), tiny_tokenizer())
    counts = [2, 5]
    img = torch.randn(2, 5, lm.hidden_size)
    mask = torch.arange(5)[None] < torch.tensor(counts)[:, None]  # (2, 5): sample 0 has 2 real tokens
    prompts, targets = ["<image> caption :"] * 2, ["a red circle", "a blue star"]
    batch = lm.build_batch(prompts, counts, targets)
    assert batch.image_mask.sum(1).tolist() == counts
    out = lm(batch, img, mask)
    assert out.hidden_states.shape[:2] == batch.input_ids.shape and out.batch is batch
    # each sample alone (its own token count, no padding) gives the same per-sample loss
    alone = [lm.caption_loss(lm.build_batch([prompts[b]], counts[b], [targets[b]]), img[b:b + 1, :counts[b]])
             for b in range(2)]
    tokens = [len(lm.target_ids(t)) for t in targets]
    expected = sum(a * n for a, n in zip(alone, tokens)) / sum(tokens)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    with pytest.raises(ValueError, match="one count >= 0 or one per prompt"):
        lm.build_batch(prompts, [2], targets)
    gen = lm.build_batch(prompts, counts)
    assert len(lm.generate(gen, img, image_mask=mask, max_new_tokens=2)) == 2


# ---------------------------------------------------------------- the only trainable LM parts
def test_added_special_tokens_are_the_only_rows_that_train(tmp_path):
    lm = FrozenLM(tiny_llama(), tiny_tokenizer())
    table = lm.word_embeddings().detach().clone()
    (seg,) = lm.add_special_tokens(["<SEG>"])
    assert lm.tokenizer.convert_ids_to_tokens(seg) == "<SEG>" and lm.vocab_size >= table.shape[0]
    assert [p.shape for p in lm.trainable_parameters()] == [(1, lm.hidden_size)]
    opt = torch.optim.AdamW(lm.trainable_parameters(), lr=0.1, weight_decay=0.1)
    batch = lm.build_batch(["<image> segment :"], 2, ["<SEG>"])
    for _ in range(3):
        loss = lm.caption_loss(batch, torch.randn(1, 2, lm.hidden_size))
        loss.backward()
        opt.step()
        opt.zero_grad()
    keep = torch.arange(table.shape[0]) != seg
    assert torch.equal(lm.word_embeddings().detach()[: table.shape[0]][keep], table[keep])  # old rows untouched
    assert not torch.equal(lm.new_rows.detach()[0], table.mean(0))  # the new row moved
    logits = lm.model.get_output_embeddings()(torch.randn(3, lm.hidden_size))
    assert logits.shape[-1] == lm.vocab_size  # <SEG> can be predicted
    lm.save_trainable(tmp_path / "lm")
    other = FrozenLM(tiny_llama(), tiny_tokenizer())
    other.load_trainable(tmp_path / "lm")
    assert other.special_tokens == ["<SEG>"] and torch.equal(other.new_rows, lm.new_rows)
    with pytest.raises(ValueError, match="already added"):
        lm.add_special_tokens(["<X>"])
    with pytest.raises(ValueError, match="already in the tokenizer"):
        FrozenLM(tiny_llama(), tiny_tokenizer()).add_special_tokens(["circle"])


def test_lora_through_peft_trains_only_its_weights_and_saves_plain_keys(tmp_path):
    from safetensors.torch import load_file

    from mmkit.llm.frozen import LoRASpec

    lm = FrozenLM(tiny_llama(), tiny_tokenizer())
    frozen = {k: v.clone() for k, v in lm.model.state_dict().items()}
    lm.add_lora(LoRASpec(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
    trainable = lm.trainable_parameters()
    assert trainable and all("lora_" in n for n, p in lm.model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=0.05)
    batch = lm.build_batch(["<image> caption :"], 2, ["a red circle"])
    img = torch.randn(1, 2, lm.hidden_size)
    before = lm.caption_loss(batch, img).item()
    for _ in range(3):
        lm.caption_loss(batch, img).backward()
        opt.step()
        opt.zero_grad()
    after_state = lm.model.state_dict()
    assert all(torch.equal(after_state[k], v) for k, v in frozen.items() if k in after_state)  # base untouched
    assert lm.caption_loss(batch, img).item() < before
    lm.save_trainable(tmp_path / "lora")
    keys = list(load_file(str(tmp_path / "lora" / "adapter.safetensors")))
    assert keys and all(k.startswith("model.layers.") and "lora_" in k for k in keys)  # no wrapper prefixes
    other = FrozenLM(tiny_llama(), tiny_tokenizer())
    other.load_trainable(tmp_path / "lora")
    assert torch.allclose(other.caption_loss(batch, img), lm.caption_loss(batch, img))
    with pytest.raises(ValueError, match="not found in the LM"):
        FrozenLM(tiny_llama(), tiny_tokenizer()).add_lora(LoRASpec(target_modules=("nope_proj",)))


@pytest.mark.parametrize("tied", [True, False])
def test_word_embeddings_train_whole_save_and_load_with_the_other_trainable_weights(tmp_path, tied):
    """LISA's / READ's embed_tokens + lm_head: with peft's LoRA on (which freezes what it does not add), the
    whole table (and an untied head) trains, is saved under plain keys and loads back; a folder saved with
    them frozen leaves the loading LM's pretrained table in place."""
    from safetensors.torch import load_file

    from mmkit.llm.frozen import LoRASpec

    lm = FrozenLM(tiny_llama(tie_word_embeddings=tied), tiny_tokenizer())
    table = lm.word_embeddings().detach().clone()
    lm.add_special_tokens(["<SEG>"])
    lm.train_word_embeddings()
    lm.add_lora(LoRASpec(r=2))
    lm.train_word_embeddings()  # again: a no-op
    weights = lm.word_embedding_parameters()
    assert sorted(weights) == (["embed_tokens"] if tied else ["embed_tokens", "lm_head"])
    trainable = {id(p) for p in lm.trainable_parameters()}
    assert all(id(w) in trainable for w in weights.values()) and id(lm.new_rows) in trainable
    head_before = None if tied else weights["lm_head"].detach().clone()
    opt = torch.optim.AdamW(lm.trainable_parameters(), lr=0.05)
    batch = lm.build_batch(["<image> segment the circle :"], 2, ["it is <SEG> ."])
    img = torch.randn(1, 2, lm.hidden_size)
    for _ in range(2):
        lm.caption_loss(batch, img).backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(weights["embed_tokens"].detach(), table)  # original rows moved
    if not tied:
        assert not torch.equal(weights["lm_head"].detach(), head_before)
    lm.save_trainable(tmp_path / "all")
    keys = set(load_file(str(tmp_path / "all" / "adapter.safetensors")))
    assert {"new_tokens", "embed_tokens"} <= keys and ("lm_head" in keys) != tied
    other = FrozenLM(tiny_llama(tie_word_embeddings=tied), tiny_tokenizer())
    other.load_trainable(tmp_path / "all")
    assert other.word_embeddings_train and other.word_embeddings().requires_grad
    assert torch.equal(other.word_embeddings(), lm.word_embeddings())
    assert torch.allclose(other.caption_loss(batch, img), lm.caption_loss(batch, img))
    # a folder with the table frozen, into an LM that trains it: the pretrained table stays
    rows_only = FrozenLM(tiny_llama(tie_word_embeddings=tied), tiny_tokenizer())
    rows_only.add_special_tokens(["<SEG>"])
    rows_only.save_trainable(tmp_path / "rows")
    fresh = FrozenLM(tiny_llama(tie_word_embeddings=tied), tiny_tokenizer())
    fresh.train_word_embeddings()
    fresh.load_trainable(tmp_path / "rows")
    assert torch.equal(fresh.word_embedding_parameters()["embed_tokens"], table)


def test_generation_stops_at_a_line_break_and_user_text_stays_text():
    lm = FrozenLM(tiny_llama(), tiny_tokenizer())
    ids = lm.newline_token_ids()
    assert all("\n" in lm.tokenizer.decode([i]) for i in ids.tolist())
    batch = lm.build_batch(["<image> what is <image> ?".replace("<image>", "\ue000", 1)], 2)
    assert batch.image_mask.sum() == 2  # the second, literal "<image>" is text


def test_added_token_rows_stay_trainable_after_lora():
    """peft freezes everything but LoRA when it injects; the added <SEG> row must keep training (READ)."""
    from mmkit.llm.frozen import LoRASpec

    for order in ("tokens first", "lora first"):
        lm = FrozenLM(tiny_llama(), tiny_tokenizer())
        if order == "tokens first":
            lm.add_special_tokens(["<SEG>"])
            lm.add_lora(LoRASpec(r=2))
        else:
            lm.add_lora(LoRASpec(r=2))
            lm.add_special_tokens(["<SEG>"])
        assert lm.new_rows.requires_grad, order
        assert any(p is lm.new_rows for p in lm.trainable_parameters()), order


def test_lora_dropout_follows_the_mode_and_the_lm_stays_deterministic_in_eval():
    from mmkit.llm.frozen import LoRASpec

    lm = FrozenLM(tiny_llama(), tiny_tokenizer())
    lm.eval()
    lm.add_lora(LoRASpec(r=2, dropout=0.5))
    with torch.no_grad():
        for p in lm.trainable_parameters():
            p.add_(0.5)  # LoRA B away from zero, so dropout would show
    batch = lm.build_batch(["<image> caption :"], 2, ["a red circle"])
    img = torch.randn(1, 2, lm.hidden_size)
    assert lm.caption_loss(batch, img).item() == lm.caption_loss(batch, img).item()  # eval: no dropout
    lm.train()
    torch.manual_seed(0)
    assert lm.caption_loss(batch, img).item() != lm.caption_loss(batch, img).item()  # LoRA dropout active
    assert not lm.model.training  # the base LM's own dropout stays off


def test_generation_passes_the_cache_by_the_name_transformers_takes(lm, monkeypatch):
    """transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name is logged as deprecated, and goes in
    5.40): each cached decoding step hands the cache back under the name the model's output uses, so it works
    with the old name and the new one."""
    import dataclasses

    batch = lm.build_batch(["describe <image> caption :", "<image> what colour is the circle ?"], 3)
    img = torch.randn(2, 3, lm.hidden_size) * 0.5
    expected = lm.generate_ids(batch, img, max_new_tokens=4, stop_at_eos=False)
    forward, calls = lm.model.forward, []

    def recording(*args, **kwargs):
        calls.append(sorted(k for k in ("cache", "past_key_values") if k in kwargs))
        return forward(*args, **kwargs)

    monkeypatch.setattr(lm.model, "forward", recording)
    assert torch.equal(lm.generate_ids(batch, img, max_new_tokens=4, stop_at_eos=False), expected)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    name = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
    assert calls[0] == [] and calls[1:] and all(c == [name] for c in calls[1:]), calls

    @dataclasses.dataclass
    class Old:  # an output of a transformers before the rename
        logits: torch.Tensor
        past_key_values: object

    from mmkit.llm.frozen import _cache_name

    assert _cache_name(Old(torch.zeros(1), None)) == "past_key_values"

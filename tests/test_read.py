"""READ's model on tiny real classes: which state prompts SAM, what trains, the <SEG>-only baseline, losses on
empty masks, "no mask" answers and a SAM of another width."""

import pytest
import torch

from mmkit.connectors import build_connector
from mmkit.heads.sasp import PADDING, SasPConfig
from mmkit.heads.seg import ReadModel, SegConfig, dice_loss
from mmkit.llm import FrozenLM
from mmkit.models import VisionLanguageModel
from mmkit.testing import tiny_llama, tiny_sam, tiny_tokenizer

GRID = 4  # 16 image tokens
POINTS = SasPConfig(num_points=6, grid_view="image")  # these models have no encoder to say where its grid lies


def build(sasp: SasPConfig | None = POINTS, seed: int = 0, **cfg) -> ReadModel:
    torch.manual_seed(seed)
    llm = FrozenLM(tiny_llama(seed), tiny_tokenizer())
    connector = build_connector("linear", vision_dim=12, llm_dim=llm.hidden_size)
    vlm = VisionLanguageModel(None, connector, llm)
    return ReadModel(vlm, tiny_sam(seed), SegConfig(prompt_dim=20, sasp=sasp, **cfg))


def batch(b: int = 2):
    g = torch.Generator().manual_seed(7)
    features = torch.randn(b, GRID * GRID, 12, generator=g)
    prompts = ["<image> what is the red circle ?"] * b
    targets = ["the red circle is <SEG> ."] * b
    sam_embeddings = torch.randn(b, 20, 6, 6, generator=g)
    masks = torch.zeros(b, 48, 48)
    masks[:, 10:30, 12:40] = 1
    return features, prompts, targets, sam_embeddings, masks


def test_the_state_that_predicts_seg_prompts_sam():
    model = build()
    features, prompts, targets, sam_embeddings, masks = batch()
    embeds, _ = model.vlm.image_embeds(features)
    llm = model.vlm.llm
    lm_batch = llm.build_batch(prompts, embeds.shape[1], targets)
    out = llm(lm_batch, embeds)
    states, found = model.seg_states(out)
    assert found.all()
    for b in range(2):
        pos = (lm_batch.input_ids[b] == model.seg_id).nonzero()[0, 0]
        torch.testing.assert_close(states[b], out.hidden_states[b, pos - 1])  # the state *predicting* <SEG>
        image = out.hidden_states[b][lm_batch.image_mask[b]]
        torch.testing.assert_close(model.image_states(out, GRID * GRID)[b], image)
    with torch.no_grad():  # the probes' entry point: the same states, from the last layer and a kept one
        (last, first), found2 = model.teacher_forced_seg_states(features, prompts, targets, layers=(None, 1))
        kept = llm(lm_batch, embeds, keep_layers=(1,))
    torch.testing.assert_close(last, states.detach())
    torch.testing.assert_close(found2, found)
    torch.testing.assert_close(first, model.seg_states(kept, 1)[0])
    assert not torch.allclose(first, last)
    with torch.no_grad():  # a kept layer alone still says which answers hold a <SEG>
        (only,), found3 = model.teacher_forced_seg_states(features, prompts, targets, layers=(1,))
    torch.testing.assert_close(only, first)
    torch.testing.assert_close(found3, found)
    with pytest.raises(ValueError, match="at least one layer"):
        model.teacher_forced_seg_states(features, prompts, targets, layers=())


def test_forward_gives_losses_and_only_adapters_train():
    model = build()
    features, prompts, targets, sam_embeddings, masks = batch()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = model.trainable_parameters()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora" in n for n in names) and any("new_rows" in n for n in names)
    assert any(n.startswith("head.") for n in names) and any(n.startswith("sam.mask_decoder.") for n in names)
    assert not any(n.startswith("sam.vision_encoder.") or n.startswith("sam.prompt_encoder.") for n in names)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        out = model(features, prompts, targets, sam_embeddings, masks)
        assert set(out.losses) == {"loss", "ce_loss", "bce_loss", "dice_loss"}
        parts = out.losses  # READ / LISA's weights by default: 1.0 CE + 2.0 BCE + 0.5 Dice
        torch.testing.assert_close(parts["loss"], parts["ce_loss"] + 2.0 * parts["bce_loss"] + 0.5 * parts["dice_loss"])
        assert out.mask_logits.shape == (2, 48, 48) and out.coords.shape == (2, 6, 2)
        opt.zero_grad()
        out.losses["loss"].backward()
        opt.step()
    changed = {id(p) for a, p in zip(before, params, strict=True) if not torch.equal(a, p.detach())}
    name = {id(p): n for n, p in model.named_parameters()}
    moved = {name[i] for i in changed}
    # the unused multimask hypernetworks and the IoU head get no gradient (LISA trains the same set)
    for part in ("vlm.connector.", "vlm.llm.new_rows", "lora_A", "lora_B", "head.", "sam.mask_decoder.transformer.",
                 "sam.mask_decoder.output_hypernetworks_mlps.0."):
        assert any(part in n for n in moved), part
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(frozen[n], p.detach()), n


def test_mask_loss_reaches_the_llm_through_dtoc_and_the_seg_prompt():
    for sasp in (POINTS, None):
        model = build(sasp=sasp, lora_r=0)
        features, prompts, targets, sam_embeddings, masks = batch()
        out = model(features, prompts, targets, sam_embeddings, masks)
        (out.losses["bce_loss"] + out.losses["dice_loss"]).backward()
        assert model.vlm.connector.proj.weight.grad.abs().sum() > 0  # via the image states and <SEG> state
        if sasp is None:
            assert out.coords is None and out.labels is None


def test_seg_only_baseline_is_the_same_model_without_points():
    with_points, baseline = build(seed=1), build(sasp=None, seed=1)
    baseline.load_state_dict(with_points.state_dict())
    features, prompts, targets, sam_embeddings, masks = batch()
    a = with_points(features, prompts, targets, sam_embeddings, masks)
    b = baseline(features, prompts, targets, sam_embeddings, masks)
    torch.testing.assert_close(a.losses["ce_loss"], b.losses["ce_loss"])
    assert not torch.allclose(a.mask_logits, b.mask_logits)  # the points change the decoder's input


def test_segment_without_points_is_the_seg_only_decode_of_the_same_answer():
    with_points, baseline = build(seed=1), build(sasp=None, seed=1)
    baseline.load_state_dict(with_points.state_dict())
    with_points.eval(), baseline.eval()
    features, prompts, _, sam_embeddings, _ = batch()
    torch.manual_seed(0)
    both = with_points.segment(features, prompts, sam_embeddings, (48, 48), max_new_tokens=4, without_points=True)
    bare = baseline.segment(features, prompts, sam_embeddings, (48, 48), max_new_tokens=4)
    assert [r["text"] for r in both] == [r["text"] for r in bare]
    for a, b in zip(both, bare, strict=True):
        if b["mask"] is None:
            assert a["mask_without_points"] is None
        else:  # the ablation is exactly the <SEG>-only decode; the points change the mask
            assert torch.equal(a["mask_without_points"], b["mask"])
    assert "mask_without_points" not in with_points.segment(features, prompts, sam_embeddings, (48, 48),
                                                            max_new_tokens=4)[0]


def test_the_grid_follows_the_encoders_crop():
    from mmkit.encoders import load_encoder

    on_image = build(seed=3)
    on_crop = build(sasp=SasPConfig(num_points=6), seed=3)
    on_crop.load_state_dict(on_image.state_dict())
    features, prompts, targets, sam_embeddings, masks = batch()
    with pytest.raises(ValueError, match="has no encoder"):  # no encoder, no boxes: said, not guessed
        on_crop(features, prompts, targets, sam_embeddings, masks)
    side = 48  # tiny SAM's frame
    whole = torch.tensor([[0.0, 0.0, side, side]] * 2)
    a = on_image(features, prompts, targets, sam_embeddings, masks)
    b = on_crop(features, prompts, targets, sam_embeddings, masks, grid_boxes=whole)
    torch.testing.assert_close(b.coords, a.coords)  # the whole frame as the box: the old placement
    torch.testing.assert_close(b.mask_logits, a.mask_logits)
    crop = torch.tensor([[6.0, 6.0, 42.0, 42.0]] * 2)  # 87.5% in the middle
    c = on_crop(features, prompts, targets, sam_embeddings, masks, grid_boxes=crop)
    real = c.labels != PADDING
    assert real.any() and ((c.coords[real] >= 5.5) & (c.coords[real] <= 41.5)).all()  # every point on the crop
    assert not torch.allclose(c.coords[real], a.coords[real])
    # with an encoder the model finds the boxes itself: timm's centre crop of a square photo
    on_crop.vlm.encoder = load_encoder("timm:tf_efficientnet_lite0@none", token_grid=3)
    boxes = on_crop.grid_boxes(None, 2)
    torch.testing.assert_close(boxes, torch.tensor([[3.0, 3.0, 45.0, 45.0]] * 2), atol=0.25, rtol=0)
    # a 320 x 240 photo: the encoder keeps x 55..265, y 15..225; SAM sees it squeezed into its 48 x 48 frame
    wide = on_crop.grid_boxes([(320, 240)], 1)
    torch.testing.assert_close(wide, torch.tensor([[8.25, 3.0, 39.75, 45.0]]), atol=0.2, rtol=0)
    with pytest.raises(ValueError, match="2 image sizes for a batch of 1"):
        on_crop.grid_boxes([(320, 240)] * 2, 1)


def test_sasp_layer_out_of_range_is_refused_at_construction():
    with pytest.raises(ValueError, match="SasPConfig.layer=9, but the LLM has 2 decoder layers"):
        build(sasp=SasPConfig(layer=9))


def test_bundles_saved_before_grid_view_keep_the_whole_frame_placement(tmp_path):
    import json

    model = build(sasp=SasPConfig(num_points=6), seed=5)  # the new default: on the encoder's crop
    model.save_pretrained(tmp_path / "read", llm_name="tiny-llm", sam_name="tiny-sam", encoder={"spec": "none"})
    path = tmp_path / "read" / "bundle.json"
    bundle = json.loads(path.read_text())
    assert bundle["parts"]["seg"]["sasp"]["grid_view"] == "encoder"
    del bundle["parts"]["seg"]["sasp"]["grid_view"]  # as written before the field existed
    del bundle["parts"]["seg"]["dice_smooth"]
    del bundle["parts"]["seg"]["head_input_norm"]
    path.write_text(json.dumps(bundle))
    old = ReadModel.from_pretrained(tmp_path / "read", llm=FrozenLM(tiny_llama(5), tiny_tokenizer()),
                                    sam=tiny_sam(5), load_encoder=False)
    assert old.config.sasp.grid_view == "image"
    assert old.config.head_input_norm == "none" and old.head.config.input_norm == "none"
    assert old.config.dice_smooth == 1.0  # nor dice_smooth (saved here): smoothing 1, as those runs trained


def test_dice_smoothing_is_lisas_by_default():
    """LISA / READ: 1 - (2 sum(p t) / 1000 + 1e-6) / (sum(p) / 1000 + sum(t) / 1000 + 1e-6) per mask."""
    torch.manual_seed(0)
    logits, target = torch.randn(3, 8, 8) * 3, torch.rand(3, 8, 8) > 0.7
    target[2] = False  # an empty mask
    p, t = logits.sigmoid().flatten(1), target.flatten(1).float()
    lisa = 1 - (2 * (p / 1000 * t).sum(-1) + 1e-6) / ((p / 1000).sum(-1) + (t / 1000).sum(-1) + 1e-6)
    assert SegConfig().dice_smooth == 1e-3
    torch.testing.assert_close(dice_loss(logits, target, SegConfig().dice_smooth), lisa)
    assert not torch.allclose(dice_loss(logits, target, 1.0), lisa)  # the smoothing matters on small masks
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="dice_smooth must be > 0"):
            SegConfig(dice_smooth=bad)


def test_seg_only_segment_works_with_tokens_that_are_no_grid():
    model = build(sasp=None, seed=6).eval()
    _, prompts, _, sam_embeddings, _ = batch()
    features = torch.randn(2, 6, 12)  # 6 image tokens: no square grid, and <SEG>-only needs none
    for r in model.segment(features, prompts, sam_embeddings, (48, 48), max_new_tokens=4):
        assert r["similarity"] is None and r["points"] is None


def test_sasp_can_compare_the_states_of_another_layer():
    last, middle = build(seed=4), build(sasp=SasPConfig(num_points=6, grid_view="image", layer=1), seed=4)
    middle.load_state_dict(last.state_dict())
    features, prompts, targets, sam_embeddings, masks = batch()
    llm = middle.vlm.llm
    embeds = middle._grid_embeds(features, None)
    lm_batch = llm.build_batch(prompts, embeds.shape[1], targets)
    out = llm(lm_batch, embeds, keep_layers=(1, -1))
    torch.testing.assert_close(out.extras["layers"][-1], out.hidden_states)  # the last kept = the normed output
    assert not torch.allclose(out.extras["layers"][1], out.hidden_states)
    sim = middle.similarity(out, embeds.shape[1])  # the map at layer 1, by hand
    seg, _ = last.seg_states(out, 1)
    image = last.image_states(out, embeds.shape[1], 1)
    torch.testing.assert_close(sim.flatten(1), torch.einsum("bd,bnd->bn", seg, image))
    a = last(features, prompts, targets, sam_embeddings, masks)
    b = middle(features, prompts, targets, sam_embeddings, masks)
    torch.testing.assert_close(a.losses["ce_loss"], b.losses["ce_loss"])  # the same LLM pass and <SEG> prompt
    assert not torch.equal(a.coords, b.coords)  # other states, other points
    with pytest.raises(ValueError, match="layer 9 does not exist; this LM has 2 decoder layers"):
        llm(lm_batch, embeds, keep_layers=(9,))


def test_empty_masks_and_answers_without_seg():
    model = build()
    features, prompts, targets, sam_embeddings, masks = batch()
    out = model(features, prompts, targets, sam_embeddings, torch.zeros_like(masks))
    assert torch.isfinite(out.losses["loss"]) and torch.isfinite(out.losses["dice_loss"])
    assert dice_loss(torch.full((1, 4, 4), -30.0), torch.zeros(1, 4, 4)).item() < 1e-6
    no_seg = model(features, prompts, ["the red circle ."] * 2, sam_embeddings, masks)
    assert not no_seg.found.any()
    assert no_seg.losses["bce_loss"].item() == 0.0 and no_seg.losses["dice_loss"].item() == 0.0
    assert (no_seg.labels == PADDING).all()
    results = model.segment(features, prompts, sam_embeddings, (48, 48), max_new_tokens=4)
    assert len(results) == 2
    for r in results:
        assert set(r) == {"text", "mask", "points", "labels", "similarity", "seg_state", "prompt"}
        if model.config.seg_token not in r["text"]:
            assert r["mask"] is None  # "no mask", not a crash
            assert r["seg_state"] is None and r["prompt"] is None
        else:
            assert r["mask"].shape == (48, 48) and r["mask"].dtype == torch.bool


def test_a_sam_of_another_width_is_refused_clearly():
    llm = FrozenLM(tiny_llama(0), tiny_tokenizer())
    vlm = VisionLanguageModel(None, build_connector("linear", vision_dim=12, llm_dim=llm.hidden_size), llm)
    with pytest.raises(ValueError, match="prompts are 20 wide but SegConfig.prompt_dim is 256"):
        ReadModel(vlm, tiny_sam(0), SegConfig())


def test_grid_must_hold_the_image_tokens():
    model = build(grid=(3, 5))
    features, prompts, targets, sam_embeddings, masks = batch()
    with pytest.raises(ValueError, match="does not hold the 16 image tokens"):
        model(features, prompts, targets, sam_embeddings, masks)


@pytest.mark.parametrize("norm,words", [("none", "new_rows"), ("batch", "new_rows"), ("none", "all")])
def test_bundle_save_load_gives_identical_masks(tmp_path, norm, words):
    # "batch": the loaded running statistics decide the masks; "all": LISA's / READ's code's trainable
    # embed_tokens + lm_head, saved whole with the LoRA and the <SEG> row
    model = build(seed=2, head_input_norm=norm, word_embeddings=words)
    table = model.vlm.llm.word_embedding_parameters()["embed_tokens"].detach().clone()
    assert model.vlm.llm.word_embedding_parameters()["embed_tokens"].requires_grad == (words == "all")
    features, prompts, targets, sam_embeddings, masks = batch()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for _ in range(2):  # trained-looking adapters: LoRA B, the new row and the decoder all moved
        model(features, prompts, targets, sam_embeddings, masks).losses["loss"].backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path / "read", llm_name="tiny-llm", sam_name="tiny-sam", encoder={"spec": "none"})
    torch.manual_seed(123)  # the rebuilt model must not depend on the random state
    again = ReadModel.from_pretrained(tmp_path / "read", llm=FrozenLM(tiny_llama(2), tiny_tokenizer()),
                                      sam=tiny_sam(2), load_encoder=False)
    assert again.config == model.config
    moved = model.vlm.llm.word_embedding_parameters()["embed_tokens"].detach()
    assert torch.equal(moved, table) == (words == "new_rows")
    torch.testing.assert_close(again.vlm.llm.word_embedding_parameters()["embed_tokens"], moved, rtol=0, atol=0)
    assert not any(m.training for m in again.modules())  # loaded for inference, as transformers loads
    model.eval()  # LoRA dropout off
    with torch.no_grad():
        a = model(features, prompts, targets, sam_embeddings, masks)
        b = again(features, prompts, targets, sam_embeddings, masks)
    torch.testing.assert_close(a.mask_logits, b.mask_logits)
    torch.testing.assert_close(a.losses["loss"], b.losses["loss"])
    import json

    bundle = json.loads((tmp_path / "read" / "bundle.json").read_text())
    assert bundle["kind"] == "read" and set(bundle["adapters"]) == {"connector", "llm", "head", "mask_decoder"}
    with pytest.raises(ValueError, match="not a READ segmentation model"):
        model.vlm.save_pretrained(tmp_path / "vlm", llm_name="tiny-llm")
        ReadModel.from_pretrained(tmp_path / "vlm", llm=FrozenLM(tiny_llama(2), tiny_tokenizer()), sam=tiny_sam(2),
                                  load_encoder=False)


def test_a_bundle_on_a_sam_whose_mask_decoder_has_other_sizes_is_refused_naming_both(tmp_path):
    from transformers import SamModel

    model = build(seed=3)
    model.save_pretrained(tmp_path / "read", llm_name="tiny-llm", sam_name="tiny-sam", encoder={"spec": "none"})
    config = tiny_sam(3).config
    config.mask_decoder_config.mlp_dim = 44  # same prompt width (20), another decoder MLP
    other = SamModel(config)
    with pytest.raises(ValueError, match=r"mask_decoder does not fit the mask decoder of SAM 'tiny-sam': .*"
                       r"saved \(36, 20\), this SAM \(44, 20\)"):
        ReadModel.from_pretrained(tmp_path / "read", llm=FrozenLM(tiny_llama(3), tiny_tokenizer()), sam=other,
                                  load_encoder=False)


def test_segment_reports_the_seg_state_and_the_prompt_it_gave_sam(monkeypatch):
    """An answer with <SEG> (generation forced): segment() hands back the state that predicts <SEG> in the pass over
    prompt + answer and the head's prompt made of it; an answer without <SEG> gives None for both."""
    model = build(seed=6).eval()
    features, prompts, _, sam_embeddings, _ = batch()
    answers = iter([" the red circle is <SEG> .", " the red circle ."])

    def forced(self, lm_batch, image_embeds, **kwargs):
        ids = [self.tokenizer(next(answers), add_special_tokens=False, return_tensors="pt").input_ids[0]]
        return torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id)

    monkeypatch.setattr(FrozenLM, "generate_ids", forced)
    (with_seg,) = model.segment(features[:1], prompts[:1], sam_embeddings[:1], (48, 48))
    (without,) = model.segment(features[1:], prompts[1:], sam_embeddings[1:], (48, 48))
    with torch.no_grad():
        embeds, _ = model.vlm.image_embeds(features[:1])
        lm_batch = model.vlm.llm.build_batch(prompts[:1], embeds.shape[1], [with_seg["text"]])
        state, found = model.seg_states(model.vlm.llm(lm_batch, embeds))
        torch.testing.assert_close(with_seg["seg_state"], state[0].float())
        torch.testing.assert_close(with_seg["prompt"], model.head(state.float())[0])
    assert found.item() and with_seg["mask"] is not None
    assert without["seg_state"] is None and without["prompt"] is None and without["mask"] is None


def test_the_head_can_standardise_the_seg_state_per_channel(tmp_path):
    from mmkit.heads.seg import SegHead, SegHeadConfig

    with pytest.raises(ValueError, match=r"head_input_norm='layer'; accepted: \['batch', 'none'\]"):
        SegConfig(head_input_norm="layer")
    assert build(head_input_norm="batch").head.config.input_norm == "batch"
    assert build().head.config.input_norm == "none"  # LISA's head as published
    with pytest.raises(ValueError, match=r"word_embeddings must be one of \('new_rows', 'all'\), got 'rows'"):
        SegConfig(word_embeddings="rows")
    llm = FrozenLM(tiny_llama(), tiny_tokenizer())
    llm.train_word_embeddings()
    vlm = VisionLanguageModel(None, build_connector("linear", vision_dim=12, llm_dim=llm.hidden_size), llm)
    with pytest.raises(ValueError, match="trains its whole word-embedding table but SegConfig.word_embeddings"):
        ReadModel(vlm, tiny_sam(0), SegConfig(prompt_dim=20))
    from mmkit.training.seg import SegRecipeConfig

    with pytest.raises(ValueError, match="train.batch_size=1 has no spread to measure"):
        SegRecipeConfig.from_dict({"model": {"seg": {"head_input_norm": "batch"}}, "train": {"batch_size": 1}})
    torch.manual_seed(0)
    head = SegHead(SegHeadConfig(llm_dim=8, prompt_dim=4, input_norm="batch"))
    states = torch.randn(5, 8)
    shared = 50 * torch.randn(8)  # what every expression's state has in common
    torch.testing.assert_close(head(states + shared), head(states), atol=1e-4, rtol=1e-4)  # centred away
    plain = SegHead(SegHeadConfig(llm_dim=8, prompt_dim=4))
    assert not torch.allclose(plain(states + shared), plain(states), atol=1e-2)
    assert head.norm.num_batches_tracked.item() == 2 and head.norm.running_mean.abs().sum() > 0
    before = head.norm.running_mean.clone()
    one = head(states[:1])  # a training batch of one: the running statistics, no error, nothing updated
    torch.testing.assert_close(head.norm.running_mean, before)
    assert head.norm.num_batches_tracked.item() == 2
    head.eval()
    torch.testing.assert_close(one, head(states[:1]))
    head.train()
    from safetensors.torch import load_file

    from mmkit.adapters import WEIGHTS_NAME, cast_saved

    head.save_adapter(tmp_path / "head")
    (half,) = cast_saved(tmp_path / "head", tmp_path / "head16")
    assert half == tmp_path / "head16" / WEIGHTS_NAME
    saved = load_file(half)
    assert saved["net.0.weight"].dtype == torch.float16  # shipped at half size, but not the statistics
    assert saved["norm.running_mean"].dtype == saved["norm.running_var"].dtype == torch.float32
    junk = torch.cat([states, 1e3 * torch.ones(1, 8)])  # a row without <SEG> (its state is position 0's)
    keep = torch.tensor([True] * 5 + [False])
    torch.testing.assert_close(head(junk, keep)[:5], head(states), atol=1e-5, rtol=1e-5)  # shapes no statistics
    reference = torch.nn.BatchNorm1d(8, affine=False)  # the running statistics follow BatchNorm's
    fresh = SegHead(SegHeadConfig(llm_dim=8, prompt_dim=4, input_norm="batch"))
    for _ in range(3):
        reference(states), fresh(states)
    torch.testing.assert_close(fresh.norm.running_mean, reference.running_mean)
    torch.testing.assert_close(fresh.norm.running_var, reference.running_var)

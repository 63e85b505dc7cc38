"""READ's Similarity as Points on hand-made maps, DtoC against a direct float64 computation, and SAM's
prompt path against SamModel itself."""

import math

import pytest
import torch

from mmkit.heads.sam_prompt import decode_masks, sam_image_embeddings, sam_input_size, upscale_masks
from mmkit.heads.sasp import (
    NEGATIVE,
    NEUTRAL,
    PADDING,
    POSITIVE,
    SasPConfig,
    cell_centres,
    dense_map,
    discrete_to_continuous,
    min_max,
    normalised_map,
    sasp_points,
    select_points,
    similarity_map,
)
from mmkit.testing import tiny_sam


def test_select_points_orders_positives_negatives_then_neutrals():
    s = torch.tensor([[[0.5, 0.9, 0.1],
                       [1.0, 0.0, 0.85],
                       [0.3, 0.2, 0.6]]])
    index, labels = select_points(s, SasPConfig(num_points=9))
    # positives by descending score: 1.0 (cell 3), 0.9 (1), 0.85 (5); negatives ascending: 0.0 (4), 0.1 (2),
    # 0.2 (7, the threshold is inclusive); neutrals in grid order: 0 (0.5), 6 (0.3), 8 (0.6)
    assert index.tolist() == [[3, 1, 5, 4, 2, 7, 0, 6, 8]]
    assert labels.tolist() == [[POSITIVE] * 3 + [NEGATIVE] * 3 + [NEUTRAL] * 3]


def test_select_points_caps_the_count_and_pads_small_grids():
    s = (torch.arange(16.0) / 16).reshape(1, 4, 4)  # positives 13/16..15/16, negatives 0..3/16
    index, labels = select_points(s, SasPConfig(num_points=5))
    assert index.shape == labels.shape == (1, 5)
    assert index.tolist() == [[15, 14, 13, 0, 1]] and labels.tolist() == [[1, 1, 1, 0, 0]]
    index, labels = select_points(s, SasPConfig(num_points=30))
    assert index.shape == (1, 30)
    assert (labels[0, 16:] == PADDING).all() and (index[0, 16:] == 0).all() and (labels[0, :16] != PADDING).all()


def test_padding_cells_are_never_chosen():
    torch.manual_seed(0)
    s = torch.rand(2, 6, 6)
    valid = torch.zeros(2, 6, 6, dtype=torch.bool)
    valid[:, 1:5, :] = True  # a wide image letterboxed into a square grid: top and bottom rows are padding
    s[~valid] = 1.0  # padding holding the highest scores must still not be picked
    index, labels = select_points(s, SasPConfig(num_points=30), valid)
    real = labels != PADDING
    assert real.sum(1).tolist() == [24, 24]
    rows = index // 6
    assert ((rows[real] >= 1) & (rows[real] <= 4)).all()
    assert (labels[:, 24:] == PADDING).all()


def test_thresholds_and_count_are_config_fields():
    s = torch.tensor([[[0.0, 0.4, 0.65, 1.0]]])
    _, labels = select_points(s, SasPConfig(num_points=4, positive_threshold=0.6, negative_threshold=0.45))
    assert labels.tolist() == [[1, 1, 0, 0]]
    with pytest.raises(ValueError, match="negative_threshold < positive_threshold"):
        SasPConfig(positive_threshold=0.2, negative_threshold=0.3)


def test_similarity_map_is_the_raw_dot_product_on_the_grid():
    torch.manual_seed(1)
    seg, img = torch.randn(2, 8), torch.randn(2, 12, 8)
    sim = similarity_map(seg, img, (3, 4))
    expected = torch.einsum("bd,bnd->bn", seg, img).reshape(2, 3, 4)
    torch.testing.assert_close(sim, expected)
    with pytest.raises(ValueError, match="do not fill a 3x3 grid"):
        similarity_map(seg, img, (3, 3))


def test_normalised_map_downsamples_and_min_max_normalises():
    sim = torch.arange(64.0).reshape(1, 8, 8)
    norm = normalised_map(sim, 2)
    assert norm.shape == (1, 4, 4)
    assert norm.min().item() == 0.0 and norm.max().item() == 1.0
    assert torch.equal(min_max(torch.full((1, 3, 3), 2.0)), torch.zeros(1, 3, 3))  # constant map: no NaN


def test_cell_centres_map_grid_cells_to_pixels():
    index = torch.tensor([[0, 5, 11]])  # grid 3 x 4: (0, 0), (1, 1), (2, 3)
    xy = cell_centres(index, (3, 4), (30, 40))
    assert xy.tolist() == [[[4.5, 4.5], [14.5, 14.5], [34.5, 24.5]]]  # pixel-index convention (SAM adds 0.5)


def test_a_box_puts_the_grid_on_the_encoders_crop():
    index = torch.tensor([[0, 5, 11]])
    full = torch.tensor([[0.0, 0.0, 40.0, 30.0]])
    assert torch.equal(cell_centres(index, (3, 4), (30, 40), full), cell_centres(index, (3, 4), (30, 40)))
    xy = cell_centres(index, (3, 4), (30, 40), torch.tensor([[8.0, 6.0, 32.0, 24.0]]))  # 6 x 6 pixel cells
    assert xy.tolist() == [[[10.5, 8.5], [16.5, 14.5], [28.5, 20.5]]]


def test_dense_map_resizes_onto_the_box_and_zeroes_the_rest():
    torch.manual_seed(3)
    norm = torch.rand(2, 3, 4, dtype=torch.float64)
    plain = dense_map(norm, (30, 40), (30, 40))
    whole = dense_map(norm, (30, 40), (30, 40), torch.tensor([[0.0, 0.0, 40.0, 30.0]] * 2, dtype=torch.float64))
    torch.testing.assert_close(whole, plain)  # the whole image as the box: plain bilinear resizing
    box = torch.tensor([[8.0, 6.0, 32.0, 24.0], [0.0, 3.0, 20.0, 15.0]], dtype=torch.float64)
    got = dense_map(norm, (30, 40), (30, 40), box)
    for b, (x0, y0, x1, y1) in enumerate(box.long().tolist()):
        inner = torch.nn.functional.interpolate(norm[b:b + 1, None], size=(y1 - y0, x1 - x0), mode="bilinear",
                                                align_corners=False)[0, 0]
        torch.testing.assert_close(got[b, y0:y1, x0:x1], inner)
        outside = torch.ones(30, 40, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert (got[b][outside] == 0).all()
    # the points follow the box: the map's maximum cell becomes the first positive, inside the box
    seg, img = torch.zeros(1, 4), torch.zeros(1, 12, 4)
    seg[0, 0], img[0, 7, 0] = 1.0, 5.0  # cell (1, 3) of the 3 x 4 grid
    coords, labels = sasp_points(seg, img, grid=(3, 4), image_size=(30, 40), box=box[:1].float(),
                                 config=SasPConfig(down_sample=1, num_points=4, dtoc=False))
    assert labels[0, 0] == POSITIVE and coords[0, 0].tolist() == [28.5, 14.5]


def test_dtoc_equals_the_direct_windowed_softmax_mean():
    torch.manual_seed(2)
    dense = torch.rand(2, 9, 11, dtype=torch.float64)
    points = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[10.0, 8.0], [5.5, 2.25]]], dtype=torch.float64)
    sigma = 1.3
    got = discrete_to_continuous(points, dense, sigma, (9, 11))
    for b in range(2):
        prob = torch.softmax(dense[b].flatten(), 0)
        gy, gx = torch.meshgrid(torch.arange(9.0, dtype=torch.float64), torch.arange(11.0, dtype=torch.float64),
                                indexing="ij")
        for p in range(2):
            x, y = points[b, p]
            w = torch.exp(-((gx.flatten() - x) ** 2 + (gy.flatten() - y) ** 2) / (2 * sigma**2)) * prob
            w = w / w.sum()
            want = torch.stack([(w * gx.flatten()).sum(), (w * gy.flatten()).sum()])
            torch.testing.assert_close(got[b, p], want)


def test_dtoc_official_window_is_exp_minus_squared_distance():
    # sigma 1/sqrt(2) gives exp(-d^2), the official code's window; a flat map leaves a centred point in place
    points = torch.tensor([[[4.0, 4.0]]])
    moved = discrete_to_continuous(points, torch.zeros(1, 9, 9), 1 / math.sqrt(2), (9, 9))
    torch.testing.assert_close(moved, points)
    bump = torch.zeros(1, 9, 9)
    bump[0, 4, 6] = 5.0  # a strong score two pixels right pulls the point right, not up or down
    moved = discrete_to_continuous(points, bump, 1 / math.sqrt(2), (9, 9))
    assert moved[0, 0, 0] > 4.0 and abs(moved[0, 0, 1].item() - 4.0) < 1e-6


def test_dtoc_on_a_coarser_map_is_unbiased():
    """A map smaller than the image: a point on a symmetric bump's centre stays there (no half-pixel drift)."""
    dense = torch.zeros(1, 16, 16)
    dense[0, 5:7, 9:11] = 4.0  # centred between map pixels 9/10 and 5/6 -> image (10 * 4 - 0.5, 6 * 4 - 0.5)
    centre = torch.tensor([[[39.5, 23.5]]])
    moved = discrete_to_continuous(centre, dense, 1.5, (64, 64))
    torch.testing.assert_close(moved, centre, atol=1e-4, rtol=0)


def test_dtoc_gradient_reaches_the_hidden_states():
    torch.manual_seed(3)
    seg = torch.randn(2, 16, requires_grad=True)
    img = torch.randn(2, 36, 16, requires_grad=True)
    coords, labels = sasp_points(seg, img, grid=(6, 6), image_size=(48, 48), config=SasPConfig(num_points=8))
    assert coords.shape == (2, 8, 2) and labels.shape == (2, 8)
    coords.square().sum().backward()
    assert seg.grad is not None and seg.grad.abs().sum() > 0
    assert img.grad is not None and img.grad.abs().sum() > 0
    # with DtoC off the coordinates are grid centres: no gradient path
    coords, _ = sasp_points(seg, img, grid=(6, 6), image_size=(48, 48), config=SasPConfig(num_points=8, dtoc=False))
    assert not coords.requires_grad


def test_sasp_compiles_without_graph_breaks():
    seg, img = torch.randn(1, 8), torch.randn(1, 36, 8)
    cfg = SasPConfig(num_points=10)

    def f(seg, img):
        return sasp_points(seg, img, grid=(6, 6), image_size=(48, 48), config=cfg)

    explained = torch._dynamo.explain(f)(seg, img)
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.fixture(scope="module")
def sam():
    return tiny_sam(0)


def test_prompt_path_equals_sam_model_without_extra_tokens(sam):
    torch.manual_seed(4)
    pixels = torch.randn(2, 3, 48, 48)
    emb = sam_image_embeddings(sam, pixels)
    coords = torch.rand(2, 5, 2) * sam_input_size(sam)
    labels = torch.tensor([[1, 0, -1, 1, -10], [1, 1, 0, -1, -1]])
    with torch.no_grad():
        ours, iou = decode_masks(sam, emb, coords, labels)
        theirs = sam(image_embeddings=emb, input_points=coords[:, None], input_labels=labels[:, None],
                     multimask_output=False)
    torch.testing.assert_close(ours, theirs.pred_masks[:, 0])
    torch.testing.assert_close(iou, theirs.iou_scores[:, 0])


def test_extra_token_acts_as_one_more_sparse_prompt(sam):
    """An extra token equal to a point's embedding gives SamModel's masks for that point added (the decoder
    does not depend on the order of its sparse tokens)."""
    torch.manual_seed(5)
    emb = sam_image_embeddings(sam, torch.randn(1, 3, 48, 48))
    coords, labels = torch.tensor([[[10.0, 12.0], [30.0, 20.0]]]), torch.tensor([[1, 0]])
    q, q_label = torch.tensor([[[40.0, 8.0]]]), torch.tensor([[1]])
    with torch.no_grad():
        q_embedding = sam.prompt_encoder._embed_points(q[:, None], q_label[:, None], pad=False)[:, 0, 0]  # (1, C)
        ours, _ = decode_masks(sam, emb, coords, labels, extra=q_embedding)
        theirs = sam(image_embeddings=emb, input_points=torch.cat([coords, q], 1)[:, None],
                     input_labels=torch.cat([labels, q_label], 1)[:, None], multimask_output=False)
    torch.testing.assert_close(ours, theirs.pred_masks[:, 0], atol=1e-5, rtol=1e-4)


def test_decode_masks_with_only_the_extra_token_and_upscaling(sam):
    emb = sam_image_embeddings(sam, torch.randn(2, 3, 48, 48))
    extra = torch.randn(2, sam.config.prompt_encoder_config.hidden_size, requires_grad=True)
    logits, iou = decode_masks(sam, emb, None, None, extra=extra)
    assert logits.shape == (2, 1, 24, 24) and iou.shape == (2, 1)
    up = upscale_masks(logits, (48, 48))
    assert up.shape == (2, 1, 48, 48)
    up.sum().backward()
    assert extra.grad is not None and extra.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs point prompts, a box"):
        decode_masks(sam, emb, None, None)

"""VisionLanguageModel on tiny real classes: training touches only the connector, save/load, generate."""

import pytest
import torch

from mmkit.connectors import build_connector
from mmkit.encoders import load_encoder
from mmkit.llm import FrozenLM
from mmkit.models import VisionLanguageModel


@pytest.fixture
def parts(tiny_parts):
    return tiny_parts


def make_model(parts, kind="vlap"):
    encoder = load_encoder(f"hf:{parts / 'vision'}")
    llm = FrozenLM.from_pretrained(parts / "llm")
    connector = build_connector(kind, vision_dim=encoder.dim, llm_dim=llm.hidden_size)
    connector.prepare(llm=llm, texts=["a red circle"])
    return VisionLanguageModel(encoder, connector, llm, caption_prompt="<image> caption :",
                               vqa_prompt="<image> {question} answer :")


def images(n):
    from PIL import Image

    return [Image.new("RGB", (40 + i, 36), (40 * i % 255, 90, 200)) for i in range(n)]


def test_save_and_rebuild_from_connector(parts, tmp_path):
    model = make_model(parts)
    model.save_pretrained(tmp_path / "c", llm_name=str(parts / "llm"), encoder={"spec": f"hf:{parts / 'vision'}"})
    rebuilt = VisionLanguageModel.from_pretrained(tmp_path / "c")
    imgs = images(2)
    assert torch.equal(rebuilt.image_embeds(rebuilt.image_features(imgs))[0],
                       model.image_embeds(model.image_features(imgs))[0])
    assert rebuilt.caption_prompt == "<image> caption :"
    a = model.caption(images=imgs, max_new_tokens=3)
    b = rebuilt.caption(images=imgs, max_new_tokens=3)
    assert a == b and len(a) == 2


def test_dimension_mismatch_is_a_clear_error(parts):
    encoder = load_encoder(f"hf:{parts / 'vision'}")
    llm = FrozenLM.from_pretrained(parts / "llm")
    with pytest.raises(ValueError, match="vision features of width 7"):
        VisionLanguageModel(encoder, build_connector("linear", vision_dim=7, llm_dim=llm.hidden_size), llm)
    with pytest.raises(ValueError, match="hidden size is 36"):
        VisionLanguageModel(encoder, build_connector("linear", vision_dim=encoder.dim, llm_dim=5), llm)


def test_answer_and_retrieval(parts):
    model = make_model(parts)
    feats = model.image_features(images(3))
    answers = model.answer(["what colour is the circle ?"] * 3, features=feats)
    assert len(answers) == 3
    for method in ("cosine", "assignment"):
        sim = model.retrieval_similarity(feats, ["a red circle", "a blue star"], method=method)
        assert sim.shape == (3, 2) and torch.isfinite(sim).all()
    with pytest.raises(ValueError, match="method"):
        model.retrieval_similarity(feats, ["x"], method="dot")
    with pytest.raises(ValueError, match="method='assignment' needs a connector with assignment targets"):
        make_model(parts, "linear").retrieval_similarity(feats, ["x"], method="assignment")
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        model.generate(["<image> caption :"] * 2, features=feats)


@pytest.mark.parametrize("assignment", ["prior_weighted", "balanced"])
def test_retrieval_through_the_assignments_uses_the_training_reading(parts, assignment):
    """score(i, t) = minus L_map of the pair, with the targets the connector trains on (chunked like batches)."""
    import torch.nn.functional as F

    from mmkit.losses import prior_weighted_assignment, prototype_scores, sinkhorn

    model = make_model(parts)
    model.connector.config.assignment = assignment
    feats = model.image_features(images(4))
    texts = ["a red circle", "a blue star", "a green square", "two"]
    sim = model.retrieval_similarity(feats, texts, method="assignment", batch_size=2)
    protos = model.llm.word_embeddings()
    code_v = prototype_scores(model.image_embeds(feats)[0].mean(1), protos).double()
    code_t = prototype_scores(model.llm.text_features(texts), protos).double()
    reading = {"balanced": sinkhorn, "prior_weighted": prior_weighted_assignment}[assignment]
    prior = model.connector.prior

    def targets(codes):  # chunks of 2 = the transport's batch
        return torch.cat([reading(codes[i : i + 2], eps=0.01, iterations=3, prototype_marginal=prior) for i in (0, 2)])

    expected = torch.empty(4, 4, dtype=torch.float64)
    q_v, q_t = targets(code_v), targets(code_t)
    for i in range(4):
        for t in range(4):
            expected[i, t] = -0.5 * (-(q_t[t] * F.log_softmax(code_v[i] / 0.01, -1)).sum()
                                     - (q_v[i] * F.log_softmax(code_t[t] / 0.01, -1)).sum())
    assert torch.allclose(sim.double(), expected, rtol=1e-4, atol=1e-3)


def test_one_image_on_its_own_is_accepted(parts):
    from PIL import Image

    model = make_model(parts)
    image = Image.new("RGB", (40, 36), (200, 30, 30))
    assert len(model.caption(images=image, max_new_tokens=2)) == 1
    assert len(model.answer("what colour is it ?", images=image, max_new_tokens=2)) == 1


def test_the_connectors_objective_runs_when_the_connector_is_ddp_wrapped(parts, tmp_path):
    """Multi-GPU training hands the VLM a DistributedDataParallel connector: the forward goes through the wrapper,
    the connector's own objective (VLAP's assignment term) through the model inside it."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = make_model(parts, kind="vlap")
    features = model.image_features(images(2))
    plain = model(features, ["<image> caption :"] * 2, ["a red circle", "a blue square"],
                  alignment_texts=["a red circle", "a blue square"])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model.connector = DistributedDataParallel(model.connector)
        wrapped = model(features, ["<image> caption :"] * 2, ["a red circle", "a blue square"],
                        alignment_texts=["a red circle", "a blue square"])
        wrapped["loss"].backward()
    finally:
        dist.destroy_process_group()
    assert set(wrapped) == set(plain) and len(plain) > 2  # the assignment terms are there
    torch.testing.assert_close(wrapped["loss"], plain["loss"])
    assert model.connector.module.proj.weight.grad is not None

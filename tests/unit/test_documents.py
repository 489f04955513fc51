"""Per-document masks for packed sequences (attention/documents.py) on one process.

The attention core against a dense-mask float64 reference, and the model: a packed sequence of two
documents with the mask gives exactly the losses and gradients of the two documents run alone.
"""

import numpy as np
import pytest
import torch

from longtrain.attention.documents import Documents, doc_runs
from longtrain.config import ConfigError, load_config
from longtrain.models import build_model, model_args
from longtrain.models.llama import CoreAttention
from longtrain.train.preflight import preflight
from reference import attention_reference, random_doc_ids


def test_doc_runs_and_refusal_of_unsorted_ids():
    assert doc_runs(np.array([0, 0, 1, 1, 1, 4])) == [(0, 0, 2), (1, 2, 5), (4, 5, 6)]
    with pytest.raises(ValueError, match="non-decreasing.*found 2 then 1 at rows 1, 2"):
        doc_runs(np.array([0, 2, 1]))


def test_single_document_needs_no_mask():
    assert Documents.from_doc_ids(torch.zeros(2, 16, dtype=torch.long)) is None
    assert Documents.from_doc_ids(torch.tensor([[0] * 8, [0] * 4 + [1] * 4])) is not None


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype,kernel,tol", [(torch.float64, "math", 1e-12), (torch.float32, "cpu_flash", 1e-5)])
def test_core_attention_with_documents_matches_dense_mask(causal, dtype, kernel, tol):
    g = torch.Generator().manual_seed(7)
    b, s, h, hkv, d = 2, 48, 4, 2, 8
    q, k, v, dout = (torch.randn(b, s, n, d, generator=g, dtype=torch.float64) for n in (h, hkv, hkv, h))
    doc_ids = random_doc_ids(b, s, g)
    want = attention_reference(q, k, v, dout, causal, doc_ids)
    leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = CoreAttention(kernel, causal=causal)(*leaves, doc_ids)
    out.backward(dout.to(dtype))
    for name, got, ref in zip(("out", "dq", "dk", "dv"), [out, *(t.grad for t in leaves)], [want[0], *want[2:]]):
        err = ((got.double() - ref).norm() / ref.norm()).item()
        assert err <= tol, (name, err)
    # and the mask matters: without it the output is different
    plain = CoreAttention(kernel, causal=causal)(*(t.detach() for t in leaves))
    assert ((plain.double() - want[0]).norm() / want[0].norm()).item() > 1e-2


def test_packed_documents_train_like_separate_sequences():
    """Two documents packed into one sequence, positions restarting at the second (as packing.py makes
    them), with the document mask: loss and every parameter gradient equal those of the two documents
    run as separate sequences (float64: only the order of additions differs)."""
    args = model_args("debug")
    model = build_model(args, device=torch.device("cpu"), dtype=torch.float64, attention_kernel="math", seed=3)
    g = torch.Generator().manual_seed(0)
    a, c = torch.randint(0, args.vocab_size, (1, 21), generator=g), torch.randint(0, args.vocab_size, (1, 11), generator=g)

    def loss_and_grads(*call_args, **kw):
        model.zero_grad()
        loss, _ = model(*call_args, **kw)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    ids = torch.cat([a, c], 1)
    labels = torch.cat([a[:, 1:], torch.full((1, 1), -100), c[:, 1:], torch.full((1, 1), -100)], 1)
    pos = torch.cat([torch.arange(21), torch.arange(11)])[None]
    docs = torch.cat([torch.zeros(21, dtype=torch.long), torch.ones(11, dtype=torch.long)])[None]
    packed_loss, packed_grads = loss_and_grads(ids, pos, labels, doc_ids_BS=docs)
    sep = [loss_and_grads(x, None, torch.cat([x[:, 1:], torch.full((1, 1), -100)], 1)) for x in (a, c)]
    assert torch.allclose(packed_loss, sep[0][0] + sep[1][0], rtol=1e-12, atol=0)
    for gp, ga, gc in zip(packed_grads, sep[0][1], sep[1][1]):
        torch.testing.assert_close(gp, ga + gc, rtol=1e-10, atol=1e-12)
    unmasked_loss, _ = loss_and_grads(ids, pos, labels)
    assert not torch.allclose(unmasked_loss, packed_loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["token_ring", "ulysses"])
def test_document_mask_with_an_sp_method_without_it_is_refused(tmp_path, method):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    cfg = load_config("debug", ["data.source=jsonl", f"data.paths=[{data}]", "parallel.sp.degree=2", "launch.nproc=2",
                                f"parallel.sp.method={method}"])
    with pytest.raises(ConfigError, match=f"parallel.sp.method={method} does not support.*data.document_mask=false"):
        preflight(cfg)

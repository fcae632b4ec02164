"""The course's digit grader (``Classifier.pth``) loads on CPU and reads the offline MNIST-M.

The offline MNIST-M follows MNIST-M's recipe; a grader trained on the real MNIST-M should
read it nearly as well as the real thing. Skips with a reason where the file is absent.
"""
from __future__ import annotations

import pytest
import torch

from hw2lib import digits, evaluate


@pytest.fixture(scope="module")
def grader():
    path = evaluate.default_grader_path()
    if path is None:
        pytest.skip("the course grader Classifier.pth is absent (set HW2_COURSE_GRADER or put it in "
                    "../shared/course/ beside the repo)")
    return evaluate.load_course_grader(path, device="cpu")


def test_grader_loads_on_cpu(grader):
    assert next(grader.parameters()).device == torch.device("cpu")
    assert sum(p.numel() for p in grader.parameters()) == 44674
    assert grader(torch.zeros(2, 3, 28, 28)).shape == (2, 10)


def test_grader_reads_offline_mnistm(grader):
    val = digits.load_domain("mnistm", "val", source="offline")
    acc, correct, total = evaluate.accuracy(grader, *val.tensors())
    assert total == len(val) and acc >= 0.95, f"course grader on offline mnistm val: {acc:.3f} ({correct}/{total})"

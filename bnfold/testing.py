"""pytest helpers: fail a test when a model is not safe to deploy.

```python
from bnfold.testing import assert_deployable

def test_model_is_deployable():
    assert_deployable(build_model().eval(), (torch.randn(8, 3, 224, 224),))
```
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from bnfold.report import render_verify
from bnfold.verify import Report, verify


class NotDeployableError(AssertionError):
    """Raised by :func:`assert_deployable`; ``.report`` holds the full :class:`~bnfold.verify.Report`."""

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report


def assert_deployable(model: Any, example_inputs: Any, **options: Any) -> Report:
    """Run :func:`bnfold.verify` and raise ``AssertionError`` with the findings table unless it passes."""
    report = verify(model, example_inputs, **options)
    if not report.ok:
        console = Console(width=160, record=True, force_terminal=False, color_system=None, emoji=False)
        with console.capture() as capture:
            render_verify([report], console)
        raise NotDeployableError("model is not deployable:\n" + capture.get(), report)
    return report

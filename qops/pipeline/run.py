"""``qops run``: every stage of the table for every target, in order, in one process, without Airflow."""

from __future__ import annotations

import logging
import time

from tqdm import tqdm

from qops.pipeline.table import plan
from qops.run_folder import RunLayout, claim, new_run_id

log = logging.getLogger(__name__)


def run_pipeline(spec, run_id: str | None = None, progress: bool = True, approved: bool = False) -> dict:
    """Run the spec's stage table (promotion included) and return the summary. A failed gate does not stop the
    other targets, nor this target's card and registration decision (the stages' own skip rules apply);
    ``approved``: the manual approval a promotion policy may require."""
    run_id = run_id or new_run_id()
    steps = plan(spec)
    with claim(RunLayout.of(spec, run_id).root, spec.digest(), spec.name, run_id, scope="run"):  # one run per folder
        bar = tqdm(steps[:-1], disable=not progress, unit="step")
        for st, target in bar:
            bar.set_description(f"{st.name}{' ' + target if target else ''}")
            t0 = time.perf_counter()
            kw = {"approved": approved} if st.name == "promote" else {}
            res = st.fn(spec, run_id, target, **kw) if st.per_target else st.fn(spec, run_id)
            if isinstance(res, dict) and res.get("skipped"):
                log.info("%s %s skipped: %s", st.name, target or "", res["reason"])
            log.info("%s %s done in %.1fs", st.name, target or "", time.perf_counter() - t0)
        return steps[-1][0].fn(spec, run_id)

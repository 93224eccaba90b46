"""The dashboard in headless Chromium against a real service running a tiny job: sign-in,
the job list, a job's loss curve growing as steps complete (fed by the event stream), the
nodes view with the node's memory, and a submit from the form. Screenshots go to
tests/ui/screenshots/ for review.
"""

from __future__ import annotations

import time

import httpx
import pytest

from .conftest import SCREENSHOTS

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


def _api(service, method, path, token="admin", **kw):
    headers = {"Authorization": f"Bearer {service['tokens'][token]}"}
    r = httpx.request(method, service["url"] + path, headers=headers, timeout=30, **kw)
    r.raise_for_status()
    return r.json()


def _sign_in(page, service, token="admin"):
    page.goto(service["url"] + "/")
    page.get_by_label("API token").fill(service["tokens"][token])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector("#who-name:not(:empty)")


def _submit_job(service, token="admin", **hyper):
    root = service["root"]
    train = _api(service, "POST", "/v1/files", token, data={"purpose": "fine-tune"},
                 files={"file": ("train.jsonl", (root / "train.jsonl").read_bytes())})
    valid = _api(service, "POST", "/v1/files", token, data={"purpose": "fine-tune"},
                 files={"file": ("valid.jsonl", (root / "valid.jsonl").read_bytes())})
    return _api(service, "POST", "/v1/fine_tuning/jobs", token, json={
        "model": "tiny-llama", "training_file": train["id"], "validation_file": valid["id"],
        "hyperparameters": {"n_epochs": 1, "batch_size": 2, **hyper}, "micro_batch_size": 2,
        "checkpoint_every": 4,
        "max_seq_len": 64, "lora": {"r": 4, "alpha": 8}, "learning_rate": 1e-3, "seed": 1})


def test_static_pages_are_locked_down(service):
    r = httpx.get(service["url"] + "/", timeout=10)
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "<script type=\"module\" src=\"/ui/js/main.js\">" in r.text
    assert httpx.get(service["url"] + "/ui/../../server.py", timeout=10).status_code == 404
    assert httpx.get(service["url"] + "/ui/js/nope.js", timeout=10).status_code == 404


def test_job_appears_and_its_loss_curve_grows_live(page, service):
    job = _submit_job(service)
    _sign_in(page, service)
    # The job list shows the job (the default view) with its status.
    row = page.locator(f"tr[data-job='{job['id']}']")
    row.wait_for(timeout=30_000)
    assert "tiny-llama" in row.inner_text()
    page.screenshot(path=str(SCREENSHOTS / "jobs.png"), full_page=True)

    # Every value the chart's point count takes, recorded in the page as it changes.
    page.evaluate("""() => { window.__points = []; }""")
    row.get_by_role("link", name=job["id"]).click()
    page.wait_for_selector("#loss-chart")
    page.evaluate("""() => {
        const el = document.getElementById('loss-chart');
        new MutationObserver(() => window.__points.push(Number(el.dataset.trainPoints || 0)))
            .observe(el, {attributes: true, attributeFilter: ['data-train-points']});
    }""")
    page.wait_for_function("() => window.__points.length && window.__points.at(-1) >= 1",
                           timeout=600_000)
    final = _wait_finished(service, job["id"])
    assert final["status"] == "succeeded", final.get("error")
    total = final["total_steps"]
    page.wait_for_function(f"() => window.__points.at(-1) >= {total}", timeout=30_000)
    seen = page.evaluate("() => window.__points")
    # The curve gained points as the steps came, not all at once, and ends with every step.
    first = next(p for p in seen if p >= 1)  # the first drawing with any point
    assert first < total and len(set(seen)) >= 2 and seen == sorted(seen), seen
    assert int(page.get_attribute("#loss-chart", "data-valid-points")) >= 1
    page.wait_for_selector("#main .status-succeeded")
    assert page.locator("canvas").count() >= 1
    page.locator("#loss-chart").scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOTS / "job.png"), full_page=True)
    assert not page.errors, page.errors


def _wait_finished(service, job_id, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = _api(service, "GET", f"/v1/fine_tuning/jobs/{job_id}")
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"{job_id} did not finish in {timeout} s")


def test_nodes_view_shows_the_nodes_memory(page, service):
    _sign_in(page, service)
    page.get_by_role("link", name="Nodes").click()
    node = page.locator("tr[data-node='local-cpu']")
    node.wait_for(timeout=30_000)
    api_node = next(n for n in _api(service, "GET", "/v1/nodes")["data"]
                    if n["name"] == "local-cpu")
    gib = api_node["total_memory_bytes"] / 1024**3
    text = node.locator(".mem-text").inner_text()
    assert f"of {gib:.1f} GiB" in text and "free" in text, text
    assert node.get_by_role("img").get_attribute("aria-label") == text
    # The node's measured speed (its agent times a matmul at join) is shown next to it.
    assert api_node["speed"] and api_node["speed"] > 0, api_node
    assert f"{api_node['speed']:.1f} TFLOP/s" in node.inner_text()
    page.screenshot(path=str(SCREENSHOTS / "nodes.png"), full_page=True)
    assert not page.errors, page.errors


def test_tenant_token_sees_no_admin_views(page, service):
    _sign_in(page, service, "acme")
    assert page.locator("#who-name").inner_text() == "acme"
    assert not page.get_by_role("link", name="Nodes").is_visible()
    page.goto(service["url"] + "/#/all-jobs")
    page.wait_for_selector("text=This view needs an admin token.")
    # The token lives in sessionStorage only: never in the URL, cookies or localStorage.
    assert service["tokens"]["acme"] not in page.url
    assert page.evaluate("() => localStorage.length") == 0
    assert not page.context.cookies()


def test_submit_from_the_form_creates_a_job(page, service):
    _sign_in(page, service, "acme")
    page.get_by_role("link", name="Submit").click()
    page.wait_for_selector("#model option[value='tiny-llama']", state="attached")
    page.get_by_label("Base model").select_option("tiny-llama")
    page.get_by_label("Training data").set_input_files(str(service["root"] / "train.jsonl"))
    page.get_by_label("Epochs").fill("1")
    page.get_by_label("Batch size").fill("8")
    page.get_by_label("Max sequence length").fill("64")
    page.get_by_label("Suffix").fill("from-the-form")
    page.screenshot(path=str(SCREENSHOTS / "submit.png"), full_page=True)
    page.get_by_role("button", name="Upload and submit").click()
    page.wait_for_url("**/#/jobs/ftjob-*", timeout=60_000)
    job_id = page.url.rsplit("/", 1)[1]
    job = _api(service, "GET", f"/v1/fine_tuning/jobs/{job_id}", "acme")
    assert job["organization_id"] == "acme" and job["suffix"] == "from-the-form"
    assert job["hyperparameters"]["n_epochs"] == 1 and job["max_seq_len"] == 64
    # A bad value comes back as the server's 400, shown next to the form.
    page.get_by_role("link", name="Submit").click()
    page.get_by_label("Training data").set_input_files(str(service["root"] / "train.jsonl"))
    page.get_by_label("Epochs").fill("1")
    page.get_by_label("Max sequence length").fill("99999999")
    page.get_by_role("button", name="Upload and submit").click()
    err = page.locator("#submit-error")
    err.wait_for(state="visible")
    page.wait_for_function("() => document.getElementById('submit-error').textContent.length")
    assert "max_seq_len" in err.inner_text()
    _api(service, "POST", f"/v1/fine_tuning/jobs/{job_id}/cancel", "acme")
    assert not [e for e in page.errors if "400" not in e], page.errors


def test_a_node_with_several_gpus_shows_a_bar_per_gpu(page, service):
    # The UI's own module, rendering a node as GET /v1/nodes returns one with two GPUs (this
    # service's only node is a CPU node; the API side is tests/pool/test_split_cluster.py).
    _sign_in(page, service)
    labels = page.evaluate("""async () => {
        const { nodeMemory } = await import("/ui/js/pool.js");
        const gpu = (index, total, free, reserved) => ({ index, name: `gpu${index}`,
            total_memory_bytes: total, free_memory_bytes: free, reserved_memory_bytes: reserved });
        const GiB = 1024 ** 3;
        const node = { total_memory_bytes: 8 * GiB, free_memory_bytes: 8 * GiB,
                       gpus: [gpu(0, 8 * GiB, 2 * GiB, 4 * GiB), gpu(1, 24 * GiB, 24 * GiB, 0)] };
        const el = nodeMemory(node);
        return [...el.querySelectorAll(".mem-text")].map((x) => x.textContent);
    }""")
    assert len(labels) == 2, labels
    assert labels[0].startswith("GPU 0 (gpu0): 2.0 GiB used by the owner, 4.0 GiB promised"), labels
    assert labels[1].startswith("GPU 1 (gpu1): ") and "free of 24.0 GiB" in labels[1], labels
    assert not page.errors, page.errors

"""POST/GET/DELETE /v1/files: validation at upload, limits, dedup, atomicity, ownership."""

from __future__ import annotations

import socket
import time

from .conftest import chat_lines, error_of, make_env, upload


def test_upload_validates_counts_and_stores_by_hash(client, env):
    data = chat_lines(12)
    r = upload(client, data, filename="../../etc/train.jsonl")
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["id"].startswith("file-") and f["object"] == "file"
    assert (f["bytes"], f["examples"], f["purpose"], f["status"]) == (len(data), 12,
                                                                      "fine-tune", "processed")
    assert f["filename"] == "train.jsonl"  # only the base name is kept
    import hashlib

    assert f["sha256"] == hashlib.sha256(data).hexdigest()
    assert client.get(f"/v1/files/{f['id']}/content").content == data
    assert client.get(f"/v1/files/{f['id']}").json()["id"] == f["id"]


def test_same_content_twice_shares_one_object(client, env):
    a = upload(client, chat_lines(5)).json()
    b = upload(client, chat_lines(5)).json()
    assert a["id"] != b["id"] and a["sha256"] == b["sha256"]
    assert len(env.objects()) == 1
    # Deleting one keeps the object for the other; deleting both removes it.
    assert client.delete(f"/v1/files/{a['id']}").json() == {"object": "file", "id": a["id"],
                                                             "deleted": True}
    assert len(env.objects()) == 1
    assert client.get(f"/v1/files/{b['id']}/content").content == chat_lines(5)
    client.delete(f"/v1/files/{b['id']}")
    assert env.objects() == []
    assert client.get(f"/v1/files/{a['id']}").status_code == 404


def test_malformed_jsonl_names_every_bad_line(client, env):
    good = chat_lines(3).decode().splitlines()
    lines = [good[0], "{not json", good[1], '{"messages": "hi"}', "", good[2], '{"foo": 1}']
    r = upload(client, ("\n".join(lines) + "\n").encode())
    assert r.status_code == 400
    err = error_of(r)
    assert err["param"] == "file" and err["code"] == "invalid_training_file"
    for n in (2, 4, 7):
        assert f"line {n}:" in err["message"], err["message"]
    for n in (1, 3, 5, 6):
        assert f"line {n}:" not in err["message"]
    assert env.objects() == [] and env.tmp_files() == []
    assert client.get("/v1/files").json()["data"] == []


def test_empty_file_is_refused(client, env):
    r = upload(client, b"")
    assert r.status_code == 400
    assert "empty" in error_of(r)["message"]
    assert env.objects() == [] and env.tmp_files() == []


def test_oversize_upload_is_413_naming_the_limit_and_leaves_nothing(tmp_path, tiny_model_dir):
    from fastapi.testclient import TestClient

    env = make_env(tmp_path, tiny_model_dir, max_upload_bytes=1000)
    with TestClient(env.app) as c:
        c.headers.update(env.headers())
        ok = upload(c, chat_lines(5)[:900].rsplit(b"\n", 1)[0] + b"\n")
        assert ok.status_code == 200, ok.text
        r = upload(c, chat_lines(40))  # ~3 KB: over the limit, under the framing slack
        assert r.status_code == 413
        err = error_of(r)
        assert "1000 bytes" in err["message"] and err["param"] == "file"
        assert err["code"] == "file_too_large"
        big = upload(c, b"x" * 200_000)  # declared length far past the limit: refused unread
        assert big.status_code == 413
    assert len(env.objects()) == 1 and env.tmp_files() == []
    env.store.close()


def test_interrupted_upload_leaves_nothing(env, live):
    """A client that sends half a multipart body and hangs up, over a real socket."""
    boundary = "XyZ"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
            f"fine-tune\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"t.jsonl\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    body_part = chat_lines(200)
    request = (f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Authorization: Bearer {env.tokens['acme']}\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
               f"Content-Length: {len(head) + len(body_part) * 2}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(request + head + body_part)
        time.sleep(0.5)  # the server has streamed part of the file into tmp/
    deadline = time.time() + 10
    while (env.tmp_files() or env.objects()) and time.time() < deadline:
        time.sleep(0.1)
    assert env.tmp_files() == [] and env.objects() == []
    assert env.store.list_files("acme")[0] == []


def test_wrong_purpose_and_missing_parts(client, env):
    r = upload(client, chat_lines(2), purpose="assistants")
    assert r.status_code == 400 and error_of(r)["param"] == "purpose"
    assert "'assistants'" in error_of(r)["message"]
    r = client.post("/v1/files", data={"purpose": "fine-tune"},
                    files={"other": ("x", b"y")})
    assert r.status_code == 400 and error_of(r)["param"] == "file"
    r = client.post("/v1/files", json={"purpose": "fine-tune"})
    assert r.status_code == 400 and "multipart/form-data" in error_of(r)["message"]
    assert env.objects() == [] and env.tmp_files() == []


def test_another_tenants_file_is_404_everywhere(client, env):
    f = upload(client, chat_lines(3)).json()
    other = env.headers("globex")
    for method, path in (("get", f"/v1/files/{f['id']}"),
                         ("get", f"/v1/files/{f['id']}/content"),
                         ("delete", f"/v1/files/{f['id']}")):
        r = getattr(client, method)(path, headers=other)
        assert r.status_code == 404, (method, path)
        assert f["id"] in error_of(r)["message"]
        assert "messages" not in r.text
    assert client.get("/v1/files", headers=other).json()["data"] == []
    assert client.get(f"/v1/files/{f['id']}").status_code == 200  # still there for its owner


def test_file_used_by_a_queued_job_cannot_be_deleted(client, env):
    f = upload(client, chat_lines(3)).json()
    job = client.post("/v1/fine_tuning/jobs",
                      json={"model": "tiny-llama", "training_file": f["id"]}).json()
    r = client.delete(f"/v1/files/{f['id']}")
    assert r.status_code == 409 and job["id"] in error_of(r)["message"]
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert client.delete(f"/v1/files/{f['id']}").status_code == 200


def test_list_files_pages(client, env):
    ids = [upload(client, chat_lines(2, seed=i)).json()["id"] for i in range(3)]
    page = client.get("/v1/files", params={"limit": 2}).json()
    assert [f["id"] for f in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = client.get("/v1/files", params={"limit": 2, "after": page["last_id"]}).json()
    assert [f["id"] for f in rest["data"]] == ids[:1] and not rest["has_more"]

#!/usr/bin/env python3
"""The script APIs tested with the clients people use: the official `openai` package against
/v1/images/* and /v1/chat/completions (the prompt enhancer), and `webuiapi` (the AUTOMATIC1111 API client) against /sdapi/v1/*, on a running
`zimage serve --model tiny --api-key KEY` (scripts/api-clients.sh starts it).

  api_clients_test.py --url http://127.0.0.1:3200 --key KEY

Exits non-zero on the first failed check, naming it.
"""

import argparse
import base64
import io
import json
import threading
import time
import urllib.request

import openai
import webuiapi
from PIL import Image

STEPS = 4  # the studio's minimum: these run the tiny model on a CPU


def png_parameters(png: bytes) -> str:
    return Image.open(io.BytesIO(png)).info.get("parameters", "")


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}", flush=True)


def test_openai(url, key):
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=900)
    ids = [m.id for m in client.models.list().data]
    check("z-image-turbo" in ids, f"models.list names z-image-turbo ({ids})")

    r = client.images.generate(model="z-image-turbo", prompt="a lighthouse at dusk", n=2, size="1024x1024",
                               response_format="b64_json", extra_body={"seed": 20, "steps": STEPS, "style": "watercolor"})
    pngs = [base64.b64decode(d.b64_json) for d in r.data]
    check(len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs), "generate n=2 b64_json gives two PNGs")
    check(all(Image.open(io.BytesIO(p)).size == (1024, 1024) for p in pngs), "both are 1024x1024")
    params = [png_parameters(p) for p in pngs]
    check("Seed: 20," in params[0] and "Seed: 21," in params[1], f"distinct seeds 20 and 21 in the PNGs ({[p[-120:] for p in params]})")
    check(r.data[0].revised_prompt and "watercolor" in r.data[0].revised_prompt.lower(), "revised_prompt carries the style")

    r = client.images.generate(prompt="a red bicycle", size="1344x768", response_format="url", extra_body={"seed": 3, "steps": STEPS})
    check(r.data[0].url.startswith(url + "/images/"), f"url answer points at our image store ({r.data[0].url})")
    png = urllib.request.urlopen(r.data[0].url).read()
    check(Image.open(io.BytesIO(png)).size == (1344, 768), "the url serves the 1344x768 PNG")

    src = Image.new("RGB", (900, 700), (200, 40, 40))
    buf = io.BytesIO()
    src.save(buf, format="PNG")
    buf.seek(0)
    r = client.images.edit(image=("in.png", buf, "image/png"), prompt="an oil painting", size="1024x1024",
                           response_format="b64_json", extra_body={"strength": "0.5", "steps": STEPS, "seed": "9"})
    out = base64.b64decode(r.data[0].b64_json)
    check(Image.open(io.BytesIO(out)).size == (1024, 1024), "edits gives a 1024x1024 PNG")
    check("Denoising strength: 0.5" in png_parameters(out), "the edit ran as Transform with strength 0.5")

    # a LoRA of the server's folder, in the body the SDK sends with extra_body
    r = client.images.generate(prompt="a lighthouse", size="1024x1024", response_format="b64_json",
                               extra_body={"seed": 4, "steps": STEPS, "loras": [{"name": "style", "scale": 1.5}]})
    params = png_parameters(base64.b64decode(r.data[0].b64_json))
    check("a lighthouse <lora:style:1.5>" in params and 'Lora hashes: "style: ' in params,
          f"extra_body loras is applied and named in the PNG ({params[:200]})")
    try:
        client.images.generate(prompt="x", size="1024x1024", extra_body={"loras": [{"name": "missing", "scale": 1}]})
        check(False, "an unknown LoRA is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "missing" in str(e.body), f"an unknown LoRA is a 400 naming it ({e.body})")

    try:
        client.images.generate(prompt="x", size="512x512")
        check(False, "a bad size is refused")
    except openai.BadRequestError as e:
        body = e.body if isinstance(e.body, dict) else {}
        check(e.status_code == 400 and body.get("param") == "size" and "1024x1024" in body.get("message", ""),
              f"a bad size is a 400 naming the allowed sizes ({body})")
    try:
        client.images.generate(prompt="x", model="dall-e-3")
        check(False, "another model is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400, "another model name is a 400")
    try:
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
        check(False, "a wrong key is refused")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, "a wrong key is a 401 in OpenAI's shape")


def test_openai_chat(url, key):
    """The prompt enhancer through chat completions (the tiny model writes gibberish: the checks are
    on the protocol, not the words). Few tokens keep it quick on a CPU."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)
    messages = [{"role": "user", "content": "a lighthouse at dusk"}]
    r = client.chat.completions.create(model="z-image-turbo", messages=messages, max_tokens=8, temperature=0, seed=1)
    text = r.choices[0].message.content
    check(r.object == "chat.completion" and r.choices[0].message.role == "assistant" and isinstance(text, str),
          f"chat.completions answers an assistant message ({text!r})")
    check(1 <= r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
          and r.choices[0].finish_reason in ("stop", "length"),
          f"usage and finish_reason are filled ({r.usage}, {r.choices[0].finish_reason})")
    again = client.chat.completions.create(model="z-image-turbo", messages=messages, max_tokens=8, temperature=0, seed=1)
    check(again.choices[0].message.content == text, "temperature 0 gives the same text again")

    stream = client.chat.completions.create(model="z-image-turbo", messages=messages, max_tokens=8, temperature=0,
                                            seed=1, stream=True)
    chunks = list(stream)
    pieces = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    check(len(chunks) >= 2 and chunks[0].choices[0].delta.role == "assistant" and finish == [r.choices[0].finish_reason],
          f"stream=True gives chunks: the role first, one finish_reason at the end ({len(chunks)} chunks, {finish})")
    check(pieces.strip() == text.strip() and len(chunks) >= 3,
          f"the streamed deltas add up to the whole answer ({pieces!r} vs {text!r})")
    try:
        client.chat.completions.create(model="z-image-turbo", messages=[{"role": "system", "content": "x"}])
        check(False, "a chat without a user message is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "user message" in str(e.body), f"no user message is a 400 saying so ({e.body})")
    try:
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="z-image-turbo", messages=messages)
        check(False, "a wrong key is refused for chat")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, "chat completions need the API key (401)")


def test_a1111(url, key):
    host, port = url.split("//")[1].split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=STEPS)
    api.session.headers["Authorization"] = f"Bearer {key}"
    check(api.util_get_model_names() == ["z-image-turbo"], "sd-models lists z-image-turbo")
    check("Euler" in api.util_get_sampler_names(), "samplers list Euler")
    check(api.util_get_current_model() == "z-image-turbo", "options name the checkpoint")
    api.util_set_model("z-image-turbo")
    check(api.get_progress()["progress"] == 0.0, "progress is 0 when idle")

    r = api.txt2img(prompt="a snowy village", seed=5, batch_size=2, width=1024, height=1024, cfg_scale=7)
    check(len(r.images) == 2 and all(i.size == (1024, 1024) for i in r.images), "txt2img batch_size=2 gives two 1024x1024 images")
    check(r.info["all_seeds"] == [5, 6], f"all_seeds is [5, 6] ({r.info.get('all_seeds')})")
    check("Seed: 5," in r.info["infotexts"][0] and "Seed: 6," in r.info["infotexts"][1], "infotexts carry the seeds")

    # A1111's variation seed strength is our variation: 0 is the plain image, more moves it
    plain = api.txt2img(prompt="a red barn", seed=9, width=1024, height=1024)
    varied = api.txt2img(prompt="a red barn", seed=9, width=1024, height=1024, subseed=-1, subseed_strength=0.5)
    check("Variation seed: 9, Variation seed strength: 0.5" in varied.info["infotexts"][0] and varied.info["subseed_strength"] == 0.5,
          f"subseed_strength is the variation, in the infotext ({varied.info['infotexts'][0][-160:]})")
    check(plain.image.tobytes() != varied.image.tobytes(), "a variation changes the image")

    loras = api.get_loras()
    check([l["name"] for l in loras] == ["style"] and len(loras[0]["metadata"]["sshs_model_hash"]) == 12,
          f"get_loras lists the folder's LoRA with its short hash ({loras})")
    r = api.txt2img(prompt="a snowy village <lora:style:0.8>", seed=5, width=1024, height=1024)
    info = r.info["infotexts"][0]
    check(info.startswith("a snowy village <lora:style:0.8>\n") and 'Lora hashes: "style: ' in info,
          f"a <lora:name:weight> tag applies the LoRA and stays in the infotext ({info[:160]})")
    try:
        api.txt2img(prompt="x <lora:missing:1>", width=1024, height=1024)
        check(False, "an unknown LoRA tag is refused")
    except RuntimeError as e:
        check("Unknown LoRA `missing`" in e.args[1], f"an unknown LoRA tag is refused, naming it ({e.args[1][:160]})")

    init = Image.new("RGB", (1024, 1024), (30, 90, 200))
    r = api.img2img(images=[init], prompt="a blue lake", denoising_strength=0.5, seed=8, width=1024, height=1024)
    check(len(r.images) == 1 and r.images[0].size == (1024, 1024), "img2img gives one 1024x1024 image")
    check(r.info["denoising_strength"] == 0.5, "img2img reports its denoising strength")

    try:
        api.txt2img(prompt="x", width=512, height=512)
        check(False, "512x512 is refused")
    except RuntimeError as e:
        check(e.args[0] == 422 and "1024x1024" in e.args[1], f"512x512 is a 422 naming the sizes ({e.args[1][:160]})")

    # A generation interrupted while it runs: progress moves, then its request answers Interrupted.
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", _try(lambda: api.txt2img(prompt="slow", n_iter=2, width=1024, height=1024))))
    t.start()
    seen = 0.0
    for _ in range(600):
        p = api.get_progress()
        seen = max(seen, p["progress"])
        if p["state"]["sampling_step"] >= 1:
            break
        time.sleep(0.2)
    check(seen > 0.0, f"progress moves while a generation runs ({seen})")
    api.interrupt()
    t.join(600)
    err = box.get("r")
    check(isinstance(err, RuntimeError) and err.args[0] == 409 and "Interrupted" in err.args[1], f"interrupt stops it ({err})")

    req = urllib.request.Request(url + "/sdapi/v1/sd-models")
    try:
        urllib.request.urlopen(req)
        check(False, "no key is refused")
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
        check(e.code == 401 and "detail" in body, "no key is a 401 in A1111's shape")


def _try(f):
    try:
        return f()
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    a = ap.parse_args()
    t0 = time.time()
    test_openai(a.url, a.key)
    test_openai_chat(a.url, a.key)
    test_a1111(a.url, a.key)
    print(f"api client tests passed in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()

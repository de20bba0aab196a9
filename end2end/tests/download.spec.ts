import { test, expect } from "@playwright/test";
import { spawn, ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import * as readline from "node:readline";
import { gotoHydrated, shot, watchConsole } from "./helpers";

// The first start of a studio whose model is not in the Hugging Face cache: a real
// `zimage serve --model test-org/tiny-zimage` fetches the tiny model's files from a local server in
// the hub's layout (scripts/tests/fake_hub.py, through HF_ENDPOINT), throttled so that the download
// takes a few seconds. The page opens at once, shows the download's progress from /readyz, holds
// the Generate button, and becomes usable without a reload.

const ROOT = path.resolve(__dirname, "..", "..");
const BIN = process.env.ZIMAGE_BIN ?? path.join(ROOT, "target/release/zimage");
const REPO = "test-org/tiny-zimage";

let work: string;
let hub: ChildProcess | undefined;
let server: ChildProcess | undefined;
let serverLog = "";

/** Spawns a command and resolves with the first `port N` (or `port 127.0.0.1:N`) it prints. */
function spawnWithPort(cmd: string, args: string[], env: NodeJS.ProcessEnv, stream: "stdout" | "stderr"): Promise<[ChildProcess, number]> {
  const child = spawn(cmd, args, { env, stdio: ["ignore", "pipe", "pipe"] });
  return new Promise((resolve, reject) => {
    const lines = readline.createInterface({ input: child[stream]! });
    child[stream === "stdout" ? "stderr" : "stdout"]!.on("data", (d) => (serverLog += d));
    lines.on("line", (line) => {
      serverLog += line + "\n";
      const m = /^port (?:[\d.]+:)?(\d+)/.exec(line);
      if (m) resolve([child, Number(m[1])]);
    });
    child.on("exit", (code) => reject(new Error(`${cmd} exited (${code}):\n${serverLog}`)));
  });
}

test.beforeAll(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), "zimage-dl-e2e-"));
  const repo = path.join(work, "repo");
  const made = spawn(BIN, ["tiny", "--out", repo], { stdio: "inherit" });
  await new Promise((ok) => made.on("exit", ok));
  let total = 0;
  const walk = (d: string) =>
    fs.readdirSync(d, { withFileTypes: true }).forEach((e) => {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else total += fs.statSync(p).size;
    });
  walk(repo);
  // about eight seconds of download
  const [h, hubPort] = await spawnWithPort(
    "python3",
    [path.join(ROOT, "scripts/tests/fake_hub.py"), "--root", repo, "--repo", REPO, "--port", "0", "--rate", String(Math.ceil(total / 8))],
    process.env,
    "stdout",
  );
  hub = h;
  const env = { ...process.env, HF_ENDPOINT: `http://127.0.0.1:${hubPort}`, HF_HOME: path.join(work, "hf") };
  delete env.HF_HUB_OFFLINE;
  delete env.HF_HUB_CACHE;
  const [s, port] = await spawnWithPort(
    BIN,
    ["serve", "--model", REPO, "--devices", "cpu", "--addr", "127.0.0.1:0", "--data-dir", path.join(work, "data"),
     "--site-root", path.join(ROOT, "target/site"), "--submissions-per-minute", "0", "--max-queued-per-client", "0"],
    env,
    "stderr",
  );
  server = s;
  process.env.DOWNLOAD_STUDIO = `http://127.0.0.1:${port}`;
});

test.afterAll(async () => {
  server?.kill("SIGKILL");
  hub?.kill("SIGKILL");
  fs.rmSync(work, { recursive: true, force: true });
});

test("the first start shows the download, then the studio works without a reload", async ({ page }) => {
  const errors = watchConsole(page, [/503/, /Service Unavailable/]);
  const studio = process.env.DOWNLOAD_STUDIO!;
  await gotoHydrated(page, studio);
  const banner = page.getByTestId("startup-status");
  await expect(banner).toBeVisible();
  await expect(page.getByTestId("startup-message")).toContainText(`Downloading ${REPO}:`);
  await expect(page.getByTestId("startup-message")).toContainText(/of [\d.]+ [kMG]?B/);
  const bar = page.getByTestId("download-progress");
  await expect(bar).toBeVisible();
  await expect(page.locator("#gen-submit")).toBeDisabled();
  // the bar moves: two readings a second and a half apart
  const first = Number(await bar.getAttribute("value"));
  await page.waitForTimeout(1500);
  const second = Number(await bar.getAttribute("value"));
  expect(second).toBeGreaterThan(first);
  expect(second).toBeLessThan(Number(await bar.getAttribute("max")));
  await page.screenshot({ path: shot("download-in-progress"), fullPage: true });

  // ready: the banner goes, the button opens, the model line names the model, all in this page
  await expect(banner).toBeHidden({ timeout: 120_000 });
  await expect(page.locator("#gen-submit")).toBeEnabled();
  await expect(page.getByTestId("model-name")).toHaveText(REPO);
  await expect(page.locator(".model-line")).toContainText("CPU");
  await page.locator("#gen-prompt").fill("a lighthouse after the download");
  await page.locator("#gen-submit").click();
  await expect(page.getByTestId("result-image")).toBeVisible();
  await page.screenshot({ path: shot("download-then-generated"), fullPage: true });
  expect(errors, serverLog).toEqual([]);
});

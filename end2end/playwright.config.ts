import { defineConfig } from "@playwright/test";
import * as path from "node:path";

// The real server on the built-in tiny model, plus a page on another origin that embeds /embed.
const PORT = Number(process.env.ZIMAGE_PORT ?? 3100);
const HOST_PORT = Number(process.env.EMBED_HOST_PORT ?? 3101);
const ROOT = path.resolve(__dirname, "..");
const BIN = process.env.ZIMAGE_BIN ?? path.join(ROOT, "target/release/zimage");
const DATA = path.join(ROOT, "target/e2e-data");
export const STUDIO = `http://127.0.0.1:${PORT}`;
export const HOST = `http://127.0.0.1:${HOST_PORT}`;

export default defineConfig({
  testDir: "./tests",
  outputDir: "./test-results",
  // tiny-model generations at the real sizes take seconds each on a 2-core CPU
  timeout: 240_000,
  expect: { timeout: 120_000 },
  fullyParallel: false,
  workers: 1,
  retries: process.env.CI ? 1 : 0,
  // the HTML report (end2end/playwright-report) keeps the screenshots tests attach (the themes at
  // desktop and phone widths, a11y.spec.ts)
  reporter: [["list"], ["html", { open: "never", outputFolder: "playwright-report" }]],
  use: {
    baseURL: STUDIO,
    viewport: { width: 1280, height: 900 },
    screenshot: "only-on-failure",
    trace: "off",
    launchOptions: {
      executablePath: process.env.CHROMIUM_PATH ?? "/usr/bin/chromium",
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    },
  },
  webServer: [
    {
      command:
        `rm -rf "${DATA}" && "${BIN}" serve --model tiny --addr 127.0.0.1:${PORT} ` +
        `--data-dir "${DATA}" --site-root "${path.join(ROOT, "target/site")}" ` +
        `--queue-capacity 2 --frame-ancestor ${HOST} ` +
        // every test's jobs come from one address (127.0.0.1): lift the limits per client
        // (30 submissions a minute, 4 queued), which the suite would otherwise run into
        `--submissions-per-minute 0 --max-queued-per-client 0`,
      // /readyz answers 503 until the model is loaded (the port opens before)
      url: `${STUDIO}/readyz`,
      timeout: 180_000,
      reuseExistingServer: false,
      stdout: "pipe",
      stderr: "pipe",
    },
    {
      command: `node embed-host.mjs`,
      url: `${HOST}/`,
      timeout: 30_000,
      reuseExistingServer: false,
      env: { STUDIO_URL: STUDIO, EMBED_HOST_PORT: String(HOST_PORT) },
    },
  ],
});

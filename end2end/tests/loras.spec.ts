import { test, expect, Page } from "@playwright/test";
import * as fs from "node:fs";
import * as path from "node:path";
import { gotoHydrated, pngText, pngWithParameters, setRange, shot, watchConsole } from "./helpers";

// The server's LoRA folder: the e2e server's data folder (playwright.config.ts) + /loras.
const ROOT = path.resolve(__dirname, "..", "..");
const LORAS = path.join(ROOT, "target", "e2e-data", "loras");
// an ai-toolkit layout LoRA for the tiny model (the engine's diffusers parity fixture)
const FIXTURE = path.join(ROOT, "engine", "tests", "fixtures", "lora", "aitoolkit.safetensors");


test("LoRAs: a file dropped in the folder is picked, applied, kept in the PNG and the history; uploads are checked", async ({ page, request }) => {
  const errors = watchConsole(page, [/400/]);
  fs.mkdirSync(LORAS, { recursive: true });
  fs.copyFileSync(FIXTURE, path.join(LORAS, "e2e ink.safetensors"));
  fs.rmSync(path.join(LORAS, "uploaded ink.safetensors"), { force: true }); // a retry starts clean

  await gotoHydrated(page, "/");
  await page.locator(".loras summary").first().click();
  // the new file is listed without a restart
  await expect(page.locator('#gen-lora-add option[value="e2e ink"]')).toHaveCount(1);
  await page.selectOption("#gen-lora-add", "e2e ink");
  await expect(page.getByTestId("gen-loras").locator(".lora")).toHaveCount(1);
  await expect(page.getByTestId("gen-loras")).toContainText("e2e ink");
  await expect(page.getByTestId("gen-loras")).toContainText("rank");
  await setRange(page, "#gen-lora-0", "1.5");
  await expect(page.getByTestId("gen-loras").locator("output")).toHaveText("1.50");

  await page.locator("#gen-prompt").fill("narwhal lora test");
  await setRange(page, "#gen-steps", "4");
  await page.locator("#gen-seed-random").uncheck();
  await page.locator("#gen-seed").fill("41");
  await page.locator("#gen-submit").click();
  const image = page.getByTestId("result-image");
  await expect(image).toBeVisible({ timeout: 240_000 });
  await page.screenshot({ path: shot("lora-generate"), fullPage: true });
  const png = Buffer.from(await (await request.get((await image.getAttribute("src"))!)).body());
  const params = pngText(png, "parameters")!;
  expect(params).toContain("narwhal lora test <lora:e2e ink:1.5>");
  expect(params).toMatch(/Lora hashes: "e2e ink: [0-9a-f]{12}"/);

  // the history keeps the LoRA set, and "use these settings" brings it back
  await page.locator("#tab-history").click();
  await page.getByTestId("history-item").first().click();
  await expect(page.getByTestId("history-settings")).toContainText("e2e ink 1.5");
  await page.getByTestId("history-reuse").click();
  await expect(page.getByTestId("gen-loras").locator(".lora")).toHaveCount(1);

  // a PNG naming a LoRA this server lacks: restored into the list, and the note names it
  await page.locator("#gen-restore").setInputFiles({
    name: "elsewhere.png",
    mimeType: "image/png",
    buffer: pngWithParameters('a fjord <lora:absent style:0.5>\nSteps: 6, Sampler: Euler, Seed: 5, Size: 1024x1024, Lora hashes: "absent style: 0123456789ab"'),
  });
  await expect(page.getByTestId("restore-note")).toContainText("Not on this server: LoRA “absent style”");
  await expect(page.locator("#gen-prompt")).toHaveValue("a fjord");
  await expect(page.getByTestId("gen-loras")).toContainText("not in this server's LoRA folder");
  await page.getByRole("button", { name: "Remove LoRA absent style" }).click();
  await expect(page.getByTestId("gen-loras").locator(".lora")).toHaveCount(0);

  // uploads: a file that is not a LoRA is refused with the reason; a LoRA is added and picked
  await page.locator("#gen-lora-upload").setInputFiles({ name: "junk.safetensors", mimeType: "application/octet-stream", buffer: Buffer.from("not a LoRA at all") });
  await expect(page.getByTestId("gen-lora-note")).toContainText("not a LoRA we can read");
  await page.locator("#gen-lora-upload").setInputFiles({ name: "uploaded ink.safetensors", mimeType: "application/octet-stream", buffer: fs.readFileSync(FIXTURE) });
  await expect(page.getByTestId("gen-lora-note")).toContainText("Added LoRA “uploaded ink”");
  await expect(page.getByTestId("gen-loras").locator(".lora")).toHaveCount(1);
  expect(fs.existsSync(path.join(LORAS, "uploaded ink.safetensors"))).toBe(true);
  await page.getByRole("button", { name: "Remove LoRA uploaded ink" }).click();
  await expect(page.getByTestId("gen-loras").locator(".lora")).toHaveCount(0);
  expect(errors).toEqual([]);
});

// A page on another origin (another port) that frames the studio's /embed and lists the
// messages it posts. Used by tests/embed.spec.ts.
import http from "node:http";

const studio = process.env.STUDIO_URL ?? "http://127.0.0.1:3100";
const port = Number(process.env.EMBED_HOST_PORT ?? 3101);

const page = (src) => `<!doctype html>
<html><head><meta charset="utf-8"><title>Embed host</title><link rel="icon" href="data:,"></head>
<body style="font-family: sans-serif">
<h1>A blog post that embeds the studio</h1>
<iframe id="studio" src="${src}" width="760" height="920" style="border:1px solid #ccc"></iframe>
<h2>Messages from the frame</h2>
<ul id="messages"></ul>
<script>
window.addEventListener("message", (e) => {
  if (e.origin !== ${JSON.stringify(studio)}) return;
  const li = document.createElement("li");
  li.dataset.type = (e.data && e.data.type) || "";
  li.textContent = JSON.stringify(e.data);
  document.getElementById("messages").appendChild(li);
});
</script>
</body></html>`;

http
  .createServer((req, res) => {
    const routes = { "/": `${studio}/embed`, "/frame-studio": `${studio}/` };
    const src = routes[req.url];
    if (src) {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
      res.end(page(src));
    } else {
      res.writeHead(404);
      res.end();
    }
  })
  .listen(port, "127.0.0.1", () => console.log(`embed host on http://127.0.0.1:${port}`));

"""The console: a page per pipeline served by the ingress (`/pipelines/console`), with
its graph drawn, live per-node figures, its recent requests as waterfalls and a form
to run it (`servegraph.console.routes`)."""

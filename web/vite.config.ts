// Builds the two pages fleetbridge serves into the Python package (app/web/static), so
// `pip install` needs no Node.  Output file names carry no content hash and no
// timestamp: the same sources and lockfile give byte-identical files, which is what
// scripts/check_web_build.py compares (FLEET_WEB_OUT builds elsewhere for that check).
import { resolve } from "node:path";
import { defineConfig } from "vite";

const outDir = process.env.FLEET_WEB_OUT ?? resolve(__dirname, "../app/web/static");

export default defineConfig({
  root: __dirname,
  base: "/static/",
  logLevel: "warn",
  build: {
    outDir,
    emptyOutDir: true,
    sourcemap: false,
    reportCompressedSize: false,
    chunkSizeWarningLimit: 4096,
    rollupOptions: {
      onwarn(warning, warn) {
        // graphiql's radix-ui dependencies mark modules "use client" (a React Server
        // Components hint that means nothing in a browser bundle).
        if (warning.code === "MODULE_LEVEL_DIRECTIVE") return;
        warn(warning);
      },
      input: {
        board: resolve(__dirname, "board/index.html"),
        graphiql: resolve(__dirname, "graphiql/index.html"),
      },
      output: {
        entryFileNames: "assets/[name].js",
        chunkFileNames: "assets/[name].js",
        assetFileNames: "assets/[name][extname]",
      },
    },
  },
});

#!/usr/bin/env bash
# Refresh the browser libraries the Jupyter glyph imports, from the npm registry, into
# kernel_provider/glyph_assets/ (beside the glyph's own jupyter.js and jupyter.css). They are
# copied byte for byte from the packages' own ES module builds (no bundler, no rebuild), with
# their licences beside them.
# Usage: scripts/vendor_glyph_libs.sh   (needs npm; change the versions below to update)
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(ansi_up@6.0.6 marked@18.2.1 dompurify@3.5.0)
target=kernel_provider/glyph_assets
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "${packages[@]}" >/dev/null)
for tarball in "$work"/*.tgz; do tar xzf "$tarball" -C "$work" && mv "$work/package" "${tarball%.tgz}"; done
mkdir -p "$target"
cp "$work"/ansi_up-*/ansi_up.js "$target/ansi_up.js"
cp "$work"/ansi_up-*/LICENSE "$target/ansi_up.LICENSE"
cp "$work"/marked-*/lib/marked.esm.js "$target/marked.esm.js"
cp "$work"/marked-*/LICENSE "$target/marked.LICENSE"
cp "$work"/dompurify-*/dist/purify.es.mjs "$target/purify.es.mjs"
cp "$work"/dompurify-*/LICENSE "$target/dompurify.LICENSE"
cp "$work"/dompurify-*/LICENSE-MPL "$target/dompurify.LICENSE-MPL"
echo "vendored ${packages[*]} into $target"

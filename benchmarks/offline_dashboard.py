"""Make asv's published dashboard work without internet access: ``python -m benchmarks.offline_dashboard``.

asv 0.6's index.html loads jQuery, flot (and its time, selection, categories and orderBars
plugins), stupidtable, blueimp-md5 and Bootstrap from public CDNs. Offline, none of them loads
and the page shows only asv's "Can not determine continental origin of swallow" error. This
script fetches the same libraries from the npm registry with the ordinary ``npm pack`` client,
copies the files into ``<html_dir>/vendor/`` and points index.html at them, with fresh
subresource-integrity hashes. Run it after every ``asv publish`` (which rewrites index.html).

Two files differ from the CDN's: npm's flot 0.8.3 ships the plugins unminified (same version,
same code), and stupidtable 1.0.1 was never published to npm, so stupid-table-plugin 1.1.3 (the
same plugin and API, ``$(table).stupidtable()``) stands in. The tarballs are kept in
``.asv/vendor-cache``, so after the first run the script needs no network either.

asv discovers benchmarks by importing every module in benchmarks/; this one defines none.
"""

import argparse
import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile

# CDN URL (as in asv 0.6's index.html) -> (npm package spec, file inside the package).
CDN_TO_NPM = {
    "https://code.jquery.com/jquery-3.3.1.min.js": ("jquery@3.3.1", "dist/jquery.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.min.js":
        ("flot@0.8.3", "jquery.flot.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.time.min.js":
        ("flot@0.8.3", "jquery.flot.time.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.selection.min.js":
        ("flot@0.8.3", "jquery.flot.selection.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.categories.min.js":
        ("flot@0.8.3", "jquery.flot.categories.js"),
    "https://cdn.jsdelivr.net/npm/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js":
        ("flot-orderbars@1.0.0", "js/jquery.flot.orderBars.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js":
        ("stupid-table-plugin@1.1.3", "stupidtable.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js":
        ("blueimp-md5@2.19.0", "js/md5.min.js"),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/js/bootstrap.min.js":
        ("bootstrap@3.1.1", "dist/js/bootstrap.min.js"),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css":
        ("bootstrap@3.1.1", "dist/css/bootstrap.min.css"),
}
# Files the vendored ones load in turn (Bootstrap's CSS refers to ../fonts/).
EXTRA_FILES = {"bootstrap@3.1.1": ["dist/fonts/glyphicons-halflings-regular.eot",
                                   "dist/fonts/glyphicons-halflings-regular.svg",
                                   "dist/fonts/glyphicons-halflings-regular.ttf",
                                   "dist/fonts/glyphicons-halflings-regular.woff"]}
TAG = re.compile(r'<(script|link)\b[^>]*?(?:src|href)="(https?://[^"]+)"[^>]*>')


def npm_tarball(spec, cache_dir):
    """The path of spec's tarball, fetched with `npm pack` unless the cache has it."""
    name, version = spec.rsplit("@", 1)
    path = os.path.join(cache_dir, f"{name}-{version}.tgz")
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        subprocess.run(["npm", "pack", spec, "--silent", "--pack-destination", cache_dir],
                       check=True, stdout=subprocess.DEVNULL)
    return path


def extract(tarball, member, destination):
    with tarfile.open(tarball) as archive:
        source = archive.extractfile(f"package/{member}")
        if source is None:
            raise SystemExit(f"{tarball} has no file {member}")
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        with open(destination, "wb") as out:
            shutil.copyfileobj(source, out)


def integrity(path):
    with open(path, "rb") as f:
        return "sha384-" + base64.b64encode(hashlib.sha384(f.read()).digest()).decode()


def vendor(html_dir, cache_dir):
    index = os.path.join(html_dir, "index.html")
    with open(index, encoding="utf-8") as f:
        page = f.read()
    unknown = sorted({m.group(2) for m in TAG.finditer(page)} - set(CDN_TO_NPM))
    if unknown:
        raise SystemExit("index.html loads files this script does not know (another asv "
                         "version?): " + ", ".join(unknown))
    local = {}
    for url, (spec, member) in CDN_TO_NPM.items():
        if url not in page:
            continue
        tarball = npm_tarball(spec, cache_dir)
        relative = f"vendor/{spec.rsplit('@', 1)[0]}/{member}"
        extract(tarball, member, os.path.join(html_dir, relative))
        for extra in EXTRA_FILES.get(spec, []):
            extract(tarball, extra, os.path.join(html_dir,
                                                 f"vendor/{spec.rsplit('@', 1)[0]}/{extra}"))
        local[url] = relative

    def rewrite(match):
        tag, url = match.group(0), match.group(2)
        tag = tag.replace(url, local[url])
        tag = re.sub(r'\s(crossorigin|referrerpolicy)="[^"]*"', "", tag)
        return re.sub(r'integrity="[^"]*"',
                      f'integrity="{integrity(os.path.join(html_dir, local[url]))}"', tag)

    with open(index, "w", encoding="utf-8") as f:
        f.write(TAG.sub(rewrite, page))
    return local


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.offline_dashboard",
                                     description=__doc__.split("\n\n")[1])
    parser.add_argument("--html-dir", default=".asv/html",
                        help="asv's html_dir (default: .asv/html, as in asv.conf.json)")
    parser.add_argument("--cache-dir", default=".asv/vendor-cache",
                        help="where npm tarballs are kept between runs")
    args = parser.parse_args(argv)
    local = vendor(args.html_dir, args.cache_dir)
    print(f"vendored {len(local)} files into {os.path.join(args.html_dir, 'vendor')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

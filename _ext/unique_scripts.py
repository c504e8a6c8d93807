"""Declare each script once per page.

sphinx-thebe adds its configuration script each time its setup event fires, and under
Jupyter Book it fires twice, so every page declared ``const THEBE_JS_URL`` twice and the
browser reported a SyntaxError. This drops repeated scripts (same file, same body) from
each page's list (sphinx-togglebutton's configuration script was repeated too, and
MathJax was loaded twice once it came from the book's own copy).
"""


def drop_repeated_scripts(app, pagename, templatename, context, doctree):
    seen, unique = set(), []
    for script in context.get("script_files", []):
        # A file once, whatever its attributes (MathJax, loaded twice, fails); an inline
        # script once per body (added once with filename None and once with "").
        filename = getattr(script, "filename", script) or ""
        key = str(filename) or getattr(script, "attributes", {}).get("body", "")
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"][:] = unique  # in place: it is the builder's own list


def setup(app):
    app.connect("html-page-context", drop_repeated_scripts, priority=900)  # after the others add theirs
    return {"parallel_read_safe": True, "parallel_write_safe": True}

"""template: render an HTML table with Chameleon (FunctionBench chameleon)."""
import random

from chameleon import PageTemplate

TEMPLATE = """<html><head><title>${title}</title></head><body>
<h1>${title}</h1>
<table>
<tr tal:repeat="row rows"><td tal:repeat="c row">${c}</td></tr>
</table>
</body></html>"""


def init(arg):
    rng = random.Random(3)
    rows = [["cell-%d-%d-%d" % (i, j, rng.randrange(1000)) for j in range(10)] for i in range(1000)]
    tmpl = PageTemplate(TEMPLATE)
    tmpl(title="warm-up", rows=[["x"]])  # compile the template now, not in the handler
    return tmpl, rows


def handler(state):
    tmpl, rows = state
    return tmpl(title="report", rows=rows).encode()

// Opens a report page in headless Chromium (Debian's, driven by
// playwright-core) and prints what a person would see, as JSON, for the
// Rust tests to compare with the run's report:
//   node check_page.cjs PAGE [SCREENSHOT] [SORT_COLUMN]
// - console errors, page errors, and every request the page makes beyond
//   itself (there must be none: the page carries all it needs)
// - every [data-metric][data-value] figure, and each chart's points
// - the sample tables' cells
// - the same figures with JavaScript off (the page must not need it)
// - with SORT_COLUMN, the state column's order after a click on that
//   column's head (the overview's sorting)
// OW_PLAYWRIGHT names the playwright-core package folder.
const { chromium } = require(process.env.OW_PLAYWRIGHT || 'playwright-core');
const url = require('url');

const [page_path, screenshot, sort_column] = process.argv.slice(2);
const page_url = url.pathToFileURL(page_path).href;

function figures() {
  const metrics = {};
  for (const el of document.querySelectorAll('[data-metric][data-value]')) {
    metrics[el.getAttribute('data-metric')] = Number(el.getAttribute('data-value'));
  }
  const status = document.querySelector('[data-metric=status]');
  const charts = {};
  for (const fig of document.querySelectorAll('figure[data-chart]')) {
    const series = {};
    for (const g of fig.querySelectorAll('g[data-series]')) {
      series[g.getAttribute('data-series')] = Array.from(g.querySelectorAll('circle')).map(c => ({
        run: c.getAttribute('data-run'), value: Number(c.getAttribute('data-value')),
      }));
    }
    charts[fig.getAttribute('data-chart')] = series;
  }
  const samples = {};
  for (const t of document.querySelectorAll('table[data-sample]')) {
    samples[t.getAttribute('data-sample')] = Array.from(t.rows).slice(1)
      .map(r => Array.from(r.cells).map(c => c.textContent));
  }
  const states = Array.from(document.querySelectorAll('tr[data-state]')).map(r => r.getAttribute('data-state'));
  const links = Array.from(document.querySelectorAll('tr[data-state] a')).map(a => a.href);
  return { metrics, status: status && status.textContent, charts, samples, states, links,
           text: document.body.innerText };
}

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.OW_CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const out = { console_errors: [], page_errors: [], requests: [] };
  const context = await browser.newContext({ viewport: { width: 1100, height: 900 } });
  const page = await context.newPage();
  page.on('console', m => { if (m.type() === 'error') out.console_errors.push(m.text()); });
  page.on('pageerror', e => out.page_errors.push(String(e)));
  page.on('request', r => { if (r.url() !== page_url) out.requests.push(r.url()); });
  await page.goto(page_url, { waitUntil: 'load' });
  Object.assign(out, await page.evaluate(figures));
  if (sort_column) {
    await page.click(`th:nth-child(${Number(sort_column)})`);
    out.sorted_states = await page.evaluate(() =>
      Array.from(document.querySelectorAll('tr[data-state]')).map(r => r.getAttribute('data-state')));
  }
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });

  const plain = await browser.newContext({ javaScriptEnabled: false });
  const nojs = await plain.newPage();
  await nojs.goto(page_url, { waitUntil: 'load' });
  out.without_js = await nojs.evaluate(figures);
  await browser.close();
  process.stdout.write(JSON.stringify(out));
})().catch(e => { console.error(e); process.exit(1); });

// A branch secretary keeps a branch of real size on a phone.
//
// The admin sets up a committee with two branches (东一支部, 西一支部), seeds about 300 members
// into 东一支部 and a few into 西一支部, and creates a secretary for 东一支部. The secretary signs in
// on a phone (choosing her own password at first sign-in) and, through the pages only: browses and
// searches the member list (her branch only, paged, no sideways scrolling), adds a member (a wrong
// ID checksum is caught on the form, with what she typed kept), edits the member's phone, enters a
// month's dues for two members and sees the totals follow, and finds only her branch under 组织管理.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchBrowser, ADMIN_PASSWORD } from './harness.mjs';

let server;
let browser;

before(async () => {
  server = await startServer();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

const PHONE = { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, deviceScaleFactor: 3, locale: 'zh-CN' };
const EAST_COUNT = 300;
const WEST_COUNT = 5;
const PAGE_SIZE = 50;

/** A JSON API call with the context's cookies; throws with the body unless the status is `expect`. */
async function api(context, method, path, data, expect) {
  const resp = await context.request.fetch(server.url + path, { method, data, timeout: 15_000 });
  const text = await resp.text();
  if (expect !== undefined && resp.status() !== expect) {
    throw new Error(`${method} ${path}: ${resp.status()} (expected ${expect}): ${text}`);
  }
  return text ? JSON.parse(text) : null;
}

/** GB 11643: the check character of the first 17 digits. */
function checkChar(first17) {
  const w = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
  let sum = 0;
  for (let i = 0; i < 17; i++) sum += Number(first17[i]) * w[i];
  return '10X98765432'[sum % 11];
}

/** A valid ID number with its birth date and gender (odd 17th digit: male). */
function person(i, area = '110105') {
  const year = 1960 + (i % 40);
  const month = String(1 + (i % 12)).padStart(2, '0');
  const day = String(1 + (i % 28)).padStart(2, '0');
  const seq = String(100 + i).padStart(3, '0'); // unique per i < 900
  const first17 = `${area}${year}${month}${day}${seq}`;
  return {
    id_number: first17 + checkChar(first17),
    birth_date: `${year}-${month}-${day}`,
    gender: Number(seq[2]) % 2 === 1 ? 'male' : 'female',
    joined_on: `${year + 25}-07-01`,
  };
}

// 20 surnames × 16 given names: 320 distinct three-character names, none a part of another.
const SURNAMES = [...'王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗'];
const GIVENS = ['建国', '秀英', '桂兰', '志强', '海燕', '文华', '丽娟', '国庆', '春梅', '德明', '玉兰', '振华', '红霞', '永平', '淑珍', '学军'];
const eastName = (i) => SURNAMES[i % SURNAMES.length] + GIVENS[Math.floor(i / SURNAMES.length)];
const westName = (i) => ['郑', '谢', '韩', '唐', '冯'][i] + '西明';

/** Runs `fn` over `items` with at most `n` at a time. */
async function pool(items, n, fn) {
  let next = 0;
  await Promise.all(Array.from({ length: n }, async () => {
    while (next < items.length) {
      const i = next++;
      await fn(items[i], i);
    }
  }));
}

async function noSidewaysScroll(page) {
  return page.evaluate(() => ({ scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth }));
}

/** The names on the member list page, and the org shown for each. */
async function listed(page) {
  return page.locator('[data-testid=members] a.mem-item').evaluateAll((as) => as.map((a) => ({
    id: a.dataset.id,
    name: a.querySelector('strong').firstChild.textContent.trim(),
    org: a.querySelectorAll('.mem-meta > span')[a.querySelector('.mem-meta').children.length - 2]?.textContent.trim(),
  })));
}

/** The detail page's facts as { label: value }. */
async function facts(page) {
  return page.locator('[data-testid=facts]').evaluate((dl) => {
    const out = {};
    const dts = dl.querySelectorAll('dt');
    for (const dt of dts) out[dt.textContent.trim()] = dt.nextElementSibling.textContent.trim();
    return out;
  });
}

test('a secretary keeps a branch of real size on a phone', { timeout: 300_000 }, async (t) => {
  const timings = {};
  const mark = (() => { let last = Date.now(); return (what) => { const now = Date.now(); timings[what] = now - last; last = now; }; })();
  const contexts = [];
  const overflow = []; // pages that scroll sideways, asserted at the end so every step still runs
  const fits = async (page, what) => {
    const w = await noSidewaysScroll(page);
    if (w.scrollWidth > 390 + 1) overflow.push(`${what}: scrollWidth ${w.scrollWidth} > 390`);
  };
  try {
    // ---- The admin sets up the tree, the secretary and the members (API) ----
    const admin = await browser.newContext();
    contexts.push(admin);
    await api(admin, 'POST', '/api/v1/session', { username: 'admin', password: ADMIN_PASSWORD }, 200);
    const committee = await api(admin, 'POST', '/api/v1/orgs', { name: '城东区委', kind: 'committee' }, 201);
    const east = await api(admin, 'POST', '/api/v1/orgs', { parent_id: committee.id, name: '东一支部', kind: 'branch' }, 201);
    const west = await api(admin, 'POST', '/api/v1/orgs', { parent_id: committee.id, name: '西一支部', kind: 'branch' }, 201);
    await api(admin, 'POST', '/api/v1/users', {
      username: 'dongsec', display_name: '王书记', password: 'initial-pass-1', role: 'secretary', org_id: east.id,
    }, 201);

    const seeds = [
      ...Array.from({ length: EAST_COUNT }, (_, i) => ({
        name: eastName(i), ...person(i), org_id: east.id, category: i % 10 === 9 ? 'probationary' : 'full',
        phone: `139${String(10_000_000 + i)}`,
      })),
      ...Array.from({ length: WEST_COUNT }, (_, i) => ({
        name: westName(i), ...person(500 + i, '310101'), org_id: west.id, category: 'full',
      })),
    ];
    await pool(seeds, 6, (m) => api(admin, 'POST', '/api/v1/members', m, 201));
    mark('seed 305 members (API)');

    // ---- The secretary signs in on a phone, choosing her own password ----
    const phone = await browser.newContext(PHONE);
    contexts.push(phone);
    const page = await phone.newPage();
    page.setDefaultTimeout(15_000);
    await page.goto(server.url + '/login');
    await page.getByLabel('用户名').fill('dongsec');
    await page.getByLabel('密码').fill('initial-pass-1');
    await page.getByRole('button', { name: '登录' }).click();
    // A user the admin created chooses her own password first.
    await page.waitForURL(/\/account\/password$/);
    assert.match(await page.locator('p.notice').innerText(), /首次登录请先设置新密码/);
    await page.getByLabel('当前密码').fill('initial-pass-1');
    await page.locator('input[name=new_password]').fill('dong-own-pass-2');
    await page.locator('input[name=confirm_password]').fill('dong-own-pass-2');
    await page.getByRole('button', { name: '保存' }).click();
    await page.waitForURL(server.url + '/');
    assert.equal(await page.getByTestId('current-user').innerText(), '王书记');
    mark('sign in + first password');

    // ---- The member list: her branch only, ~300, paged, searchable, fits the phone ----
    await page.goto(server.url + '/members');
    await fits(page, '/members');
    assert.match(await page.getByTestId('total').innerText(), new RegExp(`共 ${EAST_COUNT} 名党员，第 1–${PAGE_SIZE} 名`));
    const first = await listed(page);
    assert.equal(first.length, PAGE_SIZE);
    for (const m of first) assert.equal(m.org, '东一支部', `${m.name} is listed under ${m.org}`);
    const westNames = new Set(Array.from({ length: WEST_COUNT }, (_, i) => westName(i)));
    assert.ok(!first.some((m) => westNames.has(m.name)), '西一支部 members are not listed');
    assert.equal(await page.getByText('西一支部').count(), 0, 'no trace of 西一支部 on the list page (filters included)');

    await page.getByRole('link', { name: '下一页' }).click();
    await page.waitForURL(/offset=50/);
    assert.match(await page.getByTestId('total').innerText(), new RegExp(`共 ${EAST_COUNT} 名党员，第 51–100 名`));
    const second = await listed(page);
    assert.equal(second.length, PAGE_SIZE);
    const firstIds = new Set(first.map((m) => m.id));
    assert.ok(second.every((m) => !firstIds.has(m.id)), 'the next page shows other members');
    assert.ok(await page.getByRole('link', { name: '上一页' }).isVisible());
    await fits(page, '/members page 2');

    // Walk to the last page: 300 / 50 = 6 pages, every row in 东一支部, no one twice.
    const seen = new Set([...first, ...second].map((m) => m.id));
    for (let p = 3; p <= Math.ceil(EAST_COUNT / PAGE_SIZE); p++) {
      await page.getByRole('link', { name: '下一页' }).click();
      await page.waitForURL(new RegExp(`offset=${(p - 1) * PAGE_SIZE}`));
      for (const m of await listed(page)) {
        assert.equal(m.org, '东一支部');
        assert.ok(!seen.has(m.id), `${m.name} listed twice`);
        seen.add(m.id);
      }
    }
    assert.equal(seen.size, EAST_COUNT, 'paging through shows every member once');
    assert.equal(await page.getByRole('link', { name: '下一页' }).count(), 0, 'no next page after the last');

    // Search by name (someone not on the first page), and a 西一支部 name finds nobody.
    const wanted = eastName(237);
    await page.goto(server.url + '/members');
    await page.getByLabel('姓名或身份证号').fill(wanted);
    await page.getByRole('button', { name: '查询' }).click();
    await page.waitForURL(/[?&]q=/);
    const found = await listed(page);
    assert.deepEqual(found.map((m) => m.name), [wanted]);
    assert.match(await page.getByTestId('total').innerText(), /共 1 名党员/);
    await page.getByLabel('姓名或身份证号').fill(westName(0));
    await page.getByRole('button', { name: '查询' }).click();
    await page.getByText('没有符合条件的党员。').waitFor();
    assert.match(await page.getByTestId('total').innerText(), /共 0 名党员/);
    mark('list, page, search');

    // ---- Adding a member: a wrong checksum is caught on the form, then corrected ----
    await page.goto(server.url + '/members');
    await page.getByRole('link', { name: '新增党员' }).click();
    await page.waitForURL(/\/members\/new$/);
    await fits(page, '/members/new');
    const newbie = { name: '欧阳明远', ...person(777, '440305') };
    const bad = newbie.id_number.slice(0, 17) + (newbie.id_number[17] === '0' ? '1' : '0');
    const field = (name) => page.locator(`form.mem-form [name=${name}]`);
    await field('name').fill(newbie.name);
    await field('id_number').fill(bad);
    await field('phone').fill('13812345678');
    await field('joined_on').fill(newbie.joined_on);
    await field('employer').fill('城东街道办事处');
    assert.equal(await field('org_id').inputValue(), east.id, 'the form starts in her own branch');
    await page.getByRole('button', { name: '保存' }).click();
    await page.locator('[data-error=id_number]').waitFor();
    assert.match(page.url(), /\/members\/new$/, 'still on the form');
    assert.match(await page.locator('[data-error=id_number]').innerText(), /校验位错误/);
    assert.match(await page.locator('.mem-form p.error[role=alert]').innerText(), /有 1 处需要修改/);
    // The error sits with the ID field (inside its label), which is marked.
    const idLabel = page.locator('label[data-field=id_number]');
    assert.equal(await idLabel.getAttribute('class'), 'invalid');
    assert.equal(await idLabel.locator('[data-error=id_number]').count(), 1);
    assert.equal(await page.locator('[data-error]').count(), 1, 'only the ID number is wrong');
    // What she typed is kept.
    assert.equal(await field('name').inputValue(), newbie.name);
    assert.equal(await field('id_number').inputValue(), bad);
    assert.equal(await field('phone').inputValue(), '13812345678');
    assert.equal(await field('joined_on').inputValue(), newbie.joined_on);
    assert.equal(await field('employer').inputValue(), '城东街道办事处');
    assert.equal(await field('org_id').inputValue(), east.id);
    await fits(page, '/members/new with an error');

    await field('id_number').fill(newbie.id_number);
    await page.getByRole('button', { name: '保存' }).click();
    await page.waitForURL(/\/members\/[^/]+$/);
    const newId = page.url().split('/').pop();
    assert.notEqual(newId, 'new');
    assert.equal(await page.locator('h1').innerText(), newbie.name);
    let f = await facts(page);
    assert.equal(f['身份证号'], newbie.id_number);
    assert.equal(f['出生日期'], newbie.birth_date);
    assert.equal(f['性别'], newbie.gender === 'male' ? '男' : '女');
    assert.equal(f['手机号'], '13812345678');
    assert.equal(f['所属组织'], '东一支部');
    assert.equal(f['入党时间'], newbie.joined_on);
    assert.equal(f['工作单位'], '城东街道办事处');
    await fits(page, '/members/{id}');

    await page.goto(server.url + '/members?q=' + encodeURIComponent(newbie.name));
    assert.deepEqual((await listed(page)).map((m) => [m.id, m.name]), [[newId, newbie.name]]);
    await page.goto(server.url + '/members');
    assert.match(await page.getByTestId('total').innerText(), new RegExp(`共 ${EAST_COUNT + 1} 名党员`));
    mark('add member (error, then ok)');

    // ---- Editing the member's phone ----
    await page.goto(`${server.url}/members/${newId}`);
    await page.getByRole('link', { name: '编辑' }).click();
    await page.waitForURL(new RegExp(`/members/${newId}/edit$`));
    await fits(page, '/members/{id}/edit');
    assert.equal(await field('phone').inputValue(), '13812345678');
    await field('phone').fill('15900001111');
    await page.getByRole('button', { name: '保存' }).click();
    await page.waitForURL(new RegExp(`/members/${newId}$`));
    f = await facts(page);
    assert.equal(f['手机号'], '15900001111');
    assert.equal(f['身份证号'], newbie.id_number, 'the rest is unchanged');
    assert.equal(f['工作单位'], '城东街道办事处');
    mark('edit phone');

    // ---- A month's dues for two members, and the totals ----
    await page.goto(server.url + '/dues');
    await fits(page, '/dues');
    assert.equal(await page.locator('select[name=org]').inputValue(), east.id, 'dues open on her branch');
    const month = await page.locator('form.dues-pick input[name=month]').inputValue();
    assert.match(month, /^\d{4}-\d{2}$/);
    const sheetRows = page.locator('[data-testid=dues-sheet] tbody tr[data-member]');
    assert.equal(await sheetRows.count(), EAST_COUNT + 1, 'the sheet lists the whole branch');
    const [a, b] = [eastName(0), newbie.name];
    const idOf = async (name) => {
      const row = sheetRows.filter({ has: page.locator('td:first-child', { hasText: name }) });
      assert.equal(await row.count(), 1, `${name} on the sheet once`);
      return row.getAttribute('data-member');
    };
    const [idA, idB] = [await idOf(a), await idOf(b)];
    assert.equal(idB, newId);
    const today = `${month}-01`;
    await page.getByLabel(`${a} 应交`, { exact: true }).fill('12.00');
    await page.getByLabel(`${a} 实交`, { exact: true }).fill('12');
    await page.getByLabel(`${a} 交纳日期`, { exact: true }).fill(today);
    await page.getByLabel(`${b} 应交`, { exact: true }).fill('20.50');
    await page.getByLabel(`${b} 实交`, { exact: true }).fill('5');
    await page.getByRole('button', { name: '保存本月党费' }).click();
    await page.waitForURL(/[?&]saved=2/);
    assert.match(await page.getByRole('status').innerText(), /已保存 2 条党费记录/);
    await fits(page, '/dues after saving');

    // The sheet keeps the amounts and sums them.
    assert.equal(await page.locator(`input[name="due.${idA}"]`).inputValue(), '12.00');
    assert.equal(await page.locator(`input[name="paid.${idA}"]`).inputValue(), '12.00');
    assert.equal(await page.locator(`input[name="paid_on.${idA}"]`).inputValue(), today);
    assert.equal(await page.locator(`input[name="due.${idB}"]`).inputValue(), '20.50');
    assert.equal(await page.locator(`input[name="paid.${idB}"]`).inputValue(), '5.00');
    assert.equal(await page.locator(`tr[data-member="${idB}"] .owed`).innerText(), '15.50');
    const foot = await page.locator('[data-testid=dues-sheet] tfoot td').allInnerTexts();
    assert.match(foot[0], /已录入 2 人/);
    assert.deepEqual([foot[1], foot[2], foot[4]], ['32.50', '17.00', '15.50']);
    // The month's totals, by month and by org, and the arrears list.
    const monthRow = page.locator('[data-testid=dues-totals-months] tbody tr', { hasText: month });
    assert.deepEqual((await monthRow.locator('td').allInnerTexts()).map((s) => s.trim()), [month, '32.50', '17.00', '1', '1']);
    const monthFoot = await page.locator('[data-testid=dues-totals-months] tfoot td').allInnerTexts();
    assert.deepEqual(monthFoot.map((s) => s.trim()), ['合计', '32.50', '17.00', '1', '1']);
    const orgRow = page.locator('[data-testid=dues-totals-orgs] tbody tr', { hasText: '东一支部' });
    assert.deepEqual((await orgRow.locator('td').allInnerTexts()).map((s) => s.trim()), ['东一支部', '32.50', '17.00', '1', '1']);
    assert.equal(await page.locator('[data-testid=dues-totals-orgs]').getByText('西一支部').count(), 0);
    const arrears = await page.locator('[data-testid=dues-arrears] tbody tr').allInnerTexts();
    assert.equal(arrears.length, 1, JSON.stringify(arrears));
    assert.match(arrears[0], new RegExp(`${b}[\\s\\S]*15\\.50[\\s\\S]*${month}`));
    mark('dues');

    // ---- 组织管理: only her branch ----
    await page.goto(server.url + '/orgs');
    await fits(page, '/orgs');
    const tree = await page.locator('ul.org-tree > li').evaluateAll((lis) => lis.map((li) => li.querySelector('strong').textContent.trim()));
    assert.deepEqual(tree, ['东一支部']);
    assert.equal(await page.getByText('西一支部').count(), 0, '西一支部 is nowhere on the page');
    assert.equal(await page.getByText('城东区委').count(), 0, 'nor the committee above her');
    mark('orgs');

    assert.deepEqual(overflow, [], 'pages fit a 390 px phone without sideways scrolling');
  } finally {
    t.diagnostic(`timings (ms): ${JSON.stringify(timings)}`);
    for (const c of contexts) await c.close().catch(() => {});
  }
});

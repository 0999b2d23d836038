// A person signs in through the real sign-in page on a phone-sized screen and reaches the home page.
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

test('sign in through the page, reach home, sign out', async () => {
  const context = await browser.newContext({ viewport: { width: 390, height: 844 }, locale: 'zh-CN' });
  const page = await context.newPage();
  await page.goto(server.url + '/');
  assert.match(page.url(), /\/login$/, 'an anonymous visitor is sent to the sign-in page');

  await page.getByLabel('用户名').fill('admin');
  await page.getByLabel('密码').fill('not-the-password');
  await page.getByRole('button', { name: '登录' }).click();
  await page.getByRole('alert').waitFor();
  assert.match(await page.getByRole('alert').innerText(), /用户名或密码错误/);

  await page.getByLabel('用户名').fill('admin');
  await page.getByLabel('密码').fill(ADMIN_PASSWORD);
  await page.getByRole('button', { name: '登录' }).click();
  await page.waitForURL(server.url + '/');
  assert.match(await page.locator('h1').innerText(), /您好，系统管理员/);
  assert.equal(await page.getByTestId('current-user').innerText(), '系统管理员');
  // The navigation the later modules fill is there, and fits a phone without sideways scrolling.
  assert.ok(await page.getByText('会议直播').isVisible());
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth);
  assert.equal(overflow, false, 'no horizontal scrolling on a phone');

  await page.getByRole('button', { name: '退出' }).click();
  await page.waitForURL(/\/login$/);
  await page.goto(server.url + '/');
  assert.match(page.url(), /\/login$/, 'signed out for real');
  await context.close();
});

test('unknown pages show the 404 page', async () => {
  const page = await browser.newPage();
  const resp = await page.goto(server.url + '/no/such/page');
  assert.equal(resp.status(), 404);
  assert.match(await page.locator('h1').innerText(), /页面不存在/);
  await page.close();
});

// The room client is typed with JSDoc (`// @ts-check`): the TypeScript compiler must accept it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

test('web/static/room.js type-checks', () => {
  const tsc = fileURLToPath(new URL('./node_modules/typescript/bin/tsc', import.meta.url));
  const file = fileURLToPath(new URL('../../web/static/room.js', import.meta.url));
  const r = spawnSync(process.execPath, [tsc, '--noEmit', '--allowJs', '--checkJs', '--target', 'es2022',
    '--lib', 'es2022,dom,dom.iterable', '--skipLibCheck', file], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stdout + r.stderr);
});

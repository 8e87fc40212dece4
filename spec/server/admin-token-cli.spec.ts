/**
 * `cellcds token create --expires-in-days N` on the local data directory (real processes):
 * the token expires N days out (default 90), a lifetime out of bounds is refused naming the
 * field, and `token list` shows `expiresAt` (and no `issuedBy`: the local CLI is no token).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';

const DAY_MS = 24 * 60 * 60 * 1000;

describe('cellcds token create --expires-in-days', function () {
  this.timeout(120_000);
  let dataDir: string;
  const run = (args: string[]) =>
    spawnSync(process.execPath, ['--import', 'tsx', 'server/cli.ts', ...args], {
      env: {
        ...process.env,
        CELLCDS_DATA_DIR: dataDir,
        CELLCDS_LOG_LEVEL: 'silent',
        CELLCDS_SEED_DEMO: 'false',
      },
      encoding: 'utf8',
      timeout: 90_000,
    });

  before(() => {
    dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-toklife-cli-'));
  });
  after(() => {
    fs.rmSync(dataDir, { recursive: true, force: true });
  });

  it('issues with the lifetime asked for, lists it, refuses one out of bounds', () => {
    const before = Date.now();
    const made = run(['token', 'create', '--role', 'rule-author', '--expires-in-days', '7']);
    expect(made.status, made.stderr).to.equal(0);
    const issued = JSON.parse(made.stdout) as { id: string; expiresAt: string };
    expect(Date.parse(issued.expiresAt) - before).to.be.within(7 * DAY_MS, 7 * DAY_MS + 90_000);

    const bad = run(['token', 'create', '--role', 'rule-author', '--expires-in-days', '400']);
    // Invalid input: a usage error (exit 2), as a bad option value is.
    expect(bad.status).to.equal(2);
    expect(bad.stderr).to.include('expiresInDays');

    const list = run(['token', 'list']);
    expect(list.status, list.stderr).to.equal(0);
    const tokens = JSON.parse(list.stdout) as Array<Record<string, unknown>>;
    expect(tokens).to.have.length(1);
    expect(tokens[0]).to.include({ id: issued.id, expiresAt: issued.expiresAt });
    expect(tokens[0]).to.not.have.property('issuedBy');
  });
});

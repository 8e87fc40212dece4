import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';

/**
 * cellcds makes its data directory 0700, but an operator may have made it (0755 under the
 * usual umask): the store files inside stay 0600, yet anyone on the host can list the tenant
 * stores' names and backups. Not chmod-ed (the operator's), not refused: a warn line says so.
 */
describe('a data directory group or others may read', function () {
  this.timeout(60_000);
  const apps: TestApp[] = [];
  const dirs: string[] = [];
  const warnings = (t: TestApp) =>
    t.logLines
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .filter((l) => l.msg === 'data directory is accessible to group or others');
  const start = async (mode: number) => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-dir-mode-'));
    dirs.push(dir);
    fs.chmodSync(dir, mode);
    const t = await buildTestApp({ CELLCDS_DATA_DIR: dir });
    apps.push(t);
    return { t, dir };
  };
  after(async () => {
    for (const t of apps) {
      await t.close();
    }
    for (const d of dirs) {
      fs.rmSync(d, { recursive: true, force: true });
    }
  });

  it('logs a warning naming the directory and its mode, and leaves the mode alone', async () => {
    const { t, dir } = await start(0o755);
    const lines = warnings(t);
    expect(lines).to.have.length(1);
    expect(lines[0]).to.include({ level: 'warn', dataDir: dir, mode: '755' });
    expect(fs.statSync(dir).mode & 0o777).to.equal(0o755);
  });

  it('says nothing about a 0700 directory', async () => {
    const { t } = await start(0o700);
    expect(warnings(t)).to.deep.equal([]);
  });
});

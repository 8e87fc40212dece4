import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { freePort, startServer, type ServerProcess } from '../helpers/processes.ts';

/**
 * The startup banner's demo command signs with the demo EHR key of the data directory: only the
 * replica that seeded the demo has it. A replica without it (its own data directory, demo seeding
 * off) used to print the command anyway, and the command failed as printed.
 */
describe('startup banner on a replica without the demo EHR key', function () {
  this.timeout(120_000);
  let dataDir: string;
  let server: ServerProcess | undefined;

  before(async () => {
    dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-banner-'));
    const port = await freePort();
    server = await startServer({
      ...process.env,
      PORT: String(port),
      CELLCDS_DATA_DIR: dataDir,
      CELLCDS_ADMIN_TOKEN: `banner-operator-${String(process.pid)}-0123456789abcdef0123`,
      CELLCDS_PUBLIC_URL: '',
      CELLCDS_SEED_DEMO: 'false',
    });
  });
  after(() => {
    server?.child.kill('SIGTERM');
    fs.rmSync(dataDir, { recursive: true, force: true });
  });

  it('prints no demo command (it would fail), and still the listening and operator-token lines', () => {
    expect(fs.existsSync(path.join(dataDir, 'demo', 'ehr-issuer.private.jwk.json'))).to.equal(
      false,
    );
    const stderr = server?.stderr() ?? '';
    expect(stderr).to.include('cellcds is listening on');
    expect(stderr).to.include('Operator token for the admin API: CELLCDS_ADMIN_TOKEN');
    expect(stderr).to.not.include('order-sign --demo');
    expect(stderr).to.not.include('Try it');
  });
});

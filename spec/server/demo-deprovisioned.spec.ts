import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { freePort, runCliAsync, startServer, type ServerProcess } from '../helpers/processes.ts';

/**
 * A data directory whose demo tenant was deprovisioned. `npm start` seeds the demo tenant when
 * it is not registered; a deprovisioned id is retired (never reused), so the seed's registration
 * was refused and the service did not boot at all ("tenant id demo was deprovisioned"), after
 * the seed had already overwritten the demo EHR key with a new one.
 */
describe('npm start on a data directory whose demo tenant was deprovisioned', function () {
  this.timeout(240_000);
  let dataDir: string;
  let server: ServerProcess | undefined;
  const keyFile = () => path.join(dataDir, 'demo', 'ehr-issuer.private.jwk.json');

  const stop = async (s: ServerProcess | undefined): Promise<void> => {
    if (!s || s.child.exitCode !== null) {
      return;
    }
    const exited = new Promise((r) => s.child.once('exit', r));
    s.child.kill('SIGTERM');
    await exited;
  };

  before(() => {
    dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-demo-retired-'));
  });
  after(async () => {
    await stop(server);
    fs.rmSync(dataDir, { recursive: true, force: true });
  });

  it('boots without seeding the demo again, leaves the demo key alone and says why', async () => {
    const port = await freePort();
    const token = `demo-retired-operator-${String(process.pid)}-0123456789abcdef`;
    const env = {
      ...process.env,
      PORT: String(port),
      CELLCDS_DATA_DIR: dataDir,
      CELLCDS_ADMIN_TOKEN: token,
      CELLCDS_PUBLIC_URL: '',
    };
    server = await startServer(env);
    expect(server.stderr()).to.include('Seeded: demo tenant');
    const deleted = await runCliAsync(
      ['tenant', 'delete', 'demo', '--yes', '--url', `http://127.0.0.1:${String(port)}`],
      { ...env, CELLCDS_ADMIN_TOKEN: token },
    );
    expect(deleted.status, deleted.stderr).to.equal(0);
    await stop(server);
    const keyBefore = fs.readFileSync(keyFile(), 'utf8');

    server = await startServer(env);
    const stderr = server.stderr();
    expect(stderr).to.include('cellcds is listening on');
    expect(stderr).to.match(/demo tenant "demo" was deprovisioned on \d{4}-\d\d-\d\dT/);
    expect(stderr).to.include('CELLCDS_SEED_DEMO=false');
    expect(stderr).not.to.include('Seeded: demo tenant');
    // The demo command would sign for a tenant that no longer exists: not offered.
    expect(stderr).not.to.include('call order-sign --demo');
    expect(fs.readFileSync(keyFile(), 'utf8')).to.equal(keyBefore);
  });
});

/**
 * Only the server makes a region's keyring. An operator command (`cellcds migrate`, `evidence`)
 * opens the local keyring with `create: false`: a missing file is refused, naming the file and
 * what to do, and nothing is created (a keyring made there would hold none of the region's keys,
 * and would bind a region no server opened yet).
 */
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import {
  KeyUnavailableError,
  createLocalKeyProvider,
  keyringPath,
} from '../../../tenants/data-plane.ts';
import { asInstance, rejection, tmpDir } from './helpers.ts';

describe('tenants/ data plane: local keyring with create: false (operator commands)', () => {
  let dir: string;
  beforeEach(() => {
    dir = tmpDir();
  });
  afterEach(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  async function refusal(keyDir: string): Promise<KeyUnavailableError> {
    const err = asInstance(
      await rejection(createLocalKeyProvider({ keyDir, region: 'eu-west', create: false })),
      KeyUnavailableError,
    );
    expect(err.reason).to.equal('provider');
    expect(err.message)
      .to.include('eu-west')
      .and.include(keyringPath(keyDir, 'eu-west'))
      .and.match(/start the region's servers once/i)
      .and.include('keyProvider.dir');
    return err;
  }

  it('refuses a missing folder and creates nothing', async () => {
    const keyDir = path.join(dir, 'keys');
    await refusal(keyDir);
    expect(fs.existsSync(keyDir)).to.equal(false);
  });

  it('refuses an empty folder and leaves it empty', async () => {
    const keyDir = path.join(dir, 'keys');
    fs.mkdirSync(keyDir, { mode: 0o700 });
    await refusal(keyDir);
    expect(fs.readdirSync(keyDir)).to.deep.equal([]);
  });

  it("refuses a folder holding another region's keyring only", async () => {
    const keyDir = path.join(dir, 'keys');
    await createLocalKeyProvider({ keyDir, region: 'us-east' });
    const before = fs.readdirSync(keyDir).sort();
    await refusal(keyDir);
    expect(fs.readdirSync(keyDir).sort()).to.deep.equal(before);
  });

  it('opens the keyring the server made, the same keyring', async () => {
    const keyDir = path.join(dir, 'keys');
    const made = await createLocalKeyProvider({ keyDir, region: 'eu-west' });
    await made.createTenantKey('acme');
    const opened = await createLocalKeyProvider({ keyDir, region: 'eu-west', create: false });
    expect((await opened.describe()).keyringId).to.equal((await made.describe()).keyringId);
    expect(await opened.hasTenantKey('acme')).to.equal(true);
  });
});

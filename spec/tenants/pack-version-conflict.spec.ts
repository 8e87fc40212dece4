import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import type { RulePack } from '../../rules/index.ts';
import { ConflictError, openControlPlane } from '../../tenants/index.ts';
import type { ControlPlane } from '../../tenants/index.ts';

function pack(version: string, title: string): RulePack {
  return {
    id: 'med-safety',
    version,
    title,
    publisher: 'spec',
    description: 'spec pack',
    services: [],
    rules: [],
  };
}

function put(cp: ControlPlane, p: RulePack): Promise<'created' | 'unchanged'> {
  const hash = crypto.createHash('sha256').update(JSON.stringify(p)).digest('hex');
  return cp.packs.put({ id: p.id, version: p.version, hash, pack: p });
}

describe('tenants/ pack versions: re-pushing different content', () => {
  let dir: string;
  let cp: ControlPlane;

  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-conflict-'));
    cp = await openControlPlane({ storage: path.join(dir, 'control.sqlite') });
  });

  afterEach(async () => {
    await cp.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('names id@version and the fix: bump to the next patch not stored yet', async () => {
    await put(cp, pack('1.2.3', 'first'));
    let err: unknown;
    try {
      await put(cp, pack('1.2.3', 'changed'));
    } catch (e) {
      err = e;
    }
    expect(err).to.be.instanceOf(ConflictError);
    expect((err as Error).message).to.equal(
      'med-safety@1.2.3 is already stored with different content; versions are immutable: bump "version" (e.g. to 1.2.4) and push again',
    );
    await put(cp, pack('1.2.4', 'next'));
    try {
      await put(cp, pack('1.2.3', 'changed again'));
    } catch (e) {
      err = e;
    }
    expect((err as Error).message).to.contain('(e.g. to 1.2.5)');
  });
});

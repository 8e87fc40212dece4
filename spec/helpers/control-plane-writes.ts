/**
 * Waits for the control plane's fire-and-forget writes (an admin token's `lastUsedAt`): this
 * process queues its control-plane write transactions in order (SQLite's write lock,
 * PostgreSQL's write queue), so a write transaction started now ends after every one started
 * before it. The one used here changes nothing: revoking an id no token has (404 inside the
 * transaction, rolled back).
 */
import { expect } from 'chai';
import { NotFoundError } from '../../tenants/index.ts';
import type { ControlPlane } from '../../tenants/index.ts';

/** A well-formed token id that no token has. */
const NO_TOKEN_ID = `tok_${'0'.repeat(24)}`;

export async function controlPlaneWritesDone(cp: ControlPlane): Promise<void> {
  try {
    await cp.adminTokens.revoke(NO_TOKEN_ID);
  } catch (err) {
    expect(err).to.be.instanceOf(NotFoundError);
    return;
  }
  throw new Error(`${NO_TOKEN_ID} exists`);
}

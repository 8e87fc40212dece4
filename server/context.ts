/**
 * The dependencies an app is built from, and the per-request context set after
 * authentication. server/main.ts is the only composition root; tests build their own Deps.
 */
import type { Response } from 'express';
import type { Evaluator } from '../rules/index.ts';
import type {
  ClientIdentity,
  ControlPlane,
  KeyProvider,
  Principal,
  RegionStores,
  ReplayCacheHealth,
  Tenant,
  TokenVerifier,
} from '../tenants/index.ts';
import type { Config } from './config.ts';
import type { FailureAuditor } from './failure-audit.ts';
import { ServiceError } from './errors.ts';
import type { Logger } from './logger.ts';
import type { Metrics } from './metrics.ts';
import type { Region, RegionMatrix } from './regions.ts';
import type { ServiceDirectory } from './service-directory.ts';

export interface Deps {
  config: Config;
  log: Logger;
  controlPlane: ControlPlane;
  verifier: TokenVerifier;
  evaluator: Evaluator;
  directory: ServiceDirectory;
  /** Every region of the deployment (placement and failover policy are checked against it). */
  matrix: RegionMatrix;
  /** The region this process serves: its plane opens only this region's stores and keys. */
  region: Region;
  metrics: Metrics;
  /** This region's per-tenant encrypted stores. */
  stores: RegionStores;
  /** This region's master-key provider. */
  keyProvider: KeyProvider;
  /** Where this region's per-tenant backups are written. */
  backupDir: string;
  /** Audits refused credentials within a budget per second (server/failure-audit.ts). */
  failureAudit: FailureAuditor;
  /** sha256 of the bootstrap operator token (CELLCDS_ADMIN_TOKEN or the generated one). */
  bootstrapTokenHash?: Buffer;
  /** The shared replay cache's health (Redis configured only): a `/readyz` part. */
  replayCacheHealth?: () => Promise<ReplayCacheHealth>;
  /** Set by the serve path on SIGTERM/SIGINT: `/readyz` then answers 503 `shuttingDown`. */
  lifecycle?: { shuttingDown: boolean };
  now(): Date;
}

/** Set once per CDS Hooks request, after the client token is verified. */
export interface RequestCtx {
  requestId: string;
  tenant: Tenant;
  identity: ClientIdentity;
  log: Logger;
}

/** Set once per admin request, after the operator token is verified. */
export interface AdminCtx {
  requestId: string;
  principal: Principal;
  log: Logger;
}

export function ctxOf(res: Response): RequestCtx {
  const ctx = (res.locals as { ctx?: RequestCtx }).ctx;
  if (!ctx) {
    throw new ServiceError(500, 'internal', 'internal error', { detail: 'no request context' });
  }
  return ctx;
}

export function adminCtxOf(res: Response): AdminCtx {
  const ctx = (res.locals as { admin?: AdminCtx }).admin;
  if (!ctx) {
    throw new ServiceError(500, 'internal', 'internal error', { detail: 'no admin context' });
  }
  return ctx;
}

export function requestIdOf(res: Response): string {
  return (res.locals as { requestId?: string }).requestId ?? 'unknown';
}

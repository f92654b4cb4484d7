// Types of what the board reads, and GraphQL over HTTP with the bearer token.
import { operation } from "./documents";

export const STAGES = [
  "QUEUED", "ASSIGNED", "BUILDING", "REVIEW", "TESTING", "SHIPPED", "FAILED", "CANCELLED",
] as const;
export type Stage = (typeof STAGES)[number];
export const PRIORITIES = ["URGENT", "HIGH", "NORMAL", "LOW"] as const;
export type Priority = (typeof PRIORITIES)[number];
export type Role = "MEMBER" | "WORKER" | "ADMIN";
export const ACTIVE: ReadonlySet<Stage> = new Set(["QUEUED", "ASSIGNED", "BUILDING", "REVIEW", "TESTING"]);

export interface Job {
  id: string;
  title: string;
  stage: Stage;
  priority: Priority;
  capabilities: string[];
  engineClass: string | null;
  attempts: number;
  maxAttempts: number;
  failureReason: string | null;
  trackerItemId: string | null;
  createdAt: string;
  updatedAt: string;
  lease: { workerId: string; expiresAt: string } | null;
  metrics: { costUsd: number | null };
  item: { id: string; title: string; status: string } | null;
}

export interface PageInfo { endCursor: string | null; hasNextPage: boolean }
export interface JobPage { nodes: Job[]; pageInfo: PageInfo }

export interface Item {
  id: string;
  title: string;
  status: string;
  labels: string[];
  updatedAt: string;
}

export interface Comment { id: string; body: string; author: string; kind: "USER" | "SYSTEM"; createdAt: string }
export interface ItemDetail extends Item {
  description: string;
  comments: { nodes: Comment[]; pageInfo: { hasNextPage: boolean } };
}

export interface Viewer { productId: string; role: Role; eventCursor: string | null }

export interface GraphQLErrorShape { message: string; extensions?: { code?: string } }

/** A GraphQL answer with errors, or a transport failure (`code` NETWORK). */
export class ApiError extends Error {
  constructor(message: string, readonly code: string) {
    super(message);
  }
}

export class Api {
  constructor(private readonly token: string, private readonly url = "/graphql") {}

  /** Run the named operation of board.graphql; errors raise ApiError. */
  async run<T>(name: string, variables: Record<string, unknown> = {}): Promise<T> {
    let response: Response;
    try {
      response = await fetch(this.url, {
        method: "POST",
        headers: {
          "content-type": "application/json",
          accept: "application/graphql-response+json, application/json",
          authorization: `Bearer ${this.token}`,
        },
        body: JSON.stringify({ query: operation(name), operationName: name, variables }),
      });
    } catch {
      throw new ApiError("the server cannot be reached", "NETWORK");
    }
    let body: { data?: T | null; errors?: GraphQLErrorShape[] };
    try {
      body = await response.json();
    } catch {
      throw new ApiError(`the server answered ${response.status}`, "NETWORK");
    }
    const error = body.errors?.[0];
    if (error) throw new ApiError(error.message, error.extensions?.code ?? "ERROR");
    if (!body.data) throw new ApiError(`the server answered ${response.status}`, "NETWORK");
    return body.data;
  }
}

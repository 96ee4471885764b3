-- First start of the compose `postgres` service: one database per server, each owned by its own role.
-- Passwords come from the compose environment (.env); change them before exposing anything.
CREATE ROLE prefect LOGIN PASSWORD 'prefect';
CREATE DATABASE prefect OWNER prefect;
CREATE ROLE mlflow LOGIN PASSWORD 'mlflow';
CREATE DATABASE mlflow OWNER mlflow;

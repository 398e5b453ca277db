-- The support database the agent's tools read: a few customers and their orders.
CREATE TABLE accounts (email TEXT PRIMARY KEY, name TEXT, plan TEXT, status TEXT, since TEXT);
CREATE TABLE orders (id TEXT PRIMARY KEY, email TEXT, product TEXT, status TEXT,
                     carrier TEXT, eta TEXT, total TEXT);
INSERT INTO accounts VALUES
  ('ana@example.com', 'Ana Lima', 'Pro plan', 'active', '2023-04-02'),
  ('sam@example.com', 'Sam Okafor', 'Team plan', 'active', '2022-11-19'),
  ('lee@example.com', 'Lee Park', 'Basic plan', 'locked (too many login attempts)', '2025-01-07'),
  ('kim@example.com', 'Kim Berg', 'monthly plan', 'cancelled', '2021-06-30');
INSERT INTO orders VALUES
  ('12345', 'ana@example.com', 'Nimbus headphones', 'in transit', 'DHL', '2026-11-26', '$89.90'),
  ('10234', 'sam@example.com', 'Summit standing desk', 'delivered', 'UPS', '2026-11-18', '$240.00'),
  ('11872', 'lee@example.com', 'Pulse smartwatch', 'processing', 'FedEx', '2026-11-29', '$120.50'),
  ('13007', 'kim@example.com', 'Echo speaker', 'returned to sender', 'USPS', 'unknown', '$49.00'),
  ('14550', 'ana@example.com', 'Terra backpack', 'delayed in customs', 'DHL', '2026-12-02', '$49.00');

DROP TABLE wh_movements; DROP TABLE wh_stock;

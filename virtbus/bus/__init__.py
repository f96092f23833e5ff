"""Bus transports (RabbitMQ via aio-pika, in-process memory://) behind one interface."""
